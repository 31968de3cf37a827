"""TLS endpoints on real sockets: tls:// with a server certificate, mutual TLS with
--tls-client-ca, and faults on the TLS port (plaintext, random bytes, a silent client)
that close only that connection. Certificates come from the session's ``certs`` fixture
(a throwaway PKI made with the openssl CLI).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest
from faultkit import Certs, LoggedServer, LogTap, addr_of, closed_by_peer, reset
from support import run_cli, wait_for

import sockserve
from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., ServerThread]


def tls_server(serve: Serve, certs: Certs, *urls: str, **options: Any) -> ServerThread:
    return serve(
        "timestamp",
        *(urls or ("tls://127.0.0.1:0",)),
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        **options,
    )


def tls_request(url: str, certs: Certs, payload: bytes = b"secret", **options: Any) -> bytes:
    with sockserve.connect(url, tls_ca=certs.ca, timeout=5, **options) as c:
        return c.request(payload)


def test_tls_request_reply(serve: Serve, certs: Certs) -> None:
    st = tls_server(serve, certs, "tls://127.0.0.1:0", "tls://[::1]:0", framing="line")
    for ep in st.endpoints:
        assert tls_request(ep.url(), certs, framing="line").endswith(b"] secret")


def test_tls_client_verifies_the_server(serve: Serve, certs: Certs) -> None:
    st = tls_server(serve, certs)
    with pytest.raises(sockserve.ConnectError, match="TLS handshake failed"):
        sockserve.connect(st.url("tls"), timeout=5)  # system CAs do not know ours
    with sockserve.connect(st.url("tls"), tls_verify=False, timeout=5) as c:
        assert c.request(b"anyway").endswith(b"anyway")


def test_async_client_speaks_tls(serve: Serve, certs: Certs) -> None:
    st = tls_server(serve, certs)

    async def call() -> bytes:
        async with sockserve.aconnect(st.url("tls"), tls_ca=certs.ca, timeout=5) as c:
            return await c.request(b"async secret")

    assert asyncio.run(call()).endswith(b"async secret")


@pytest.mark.parametrize("client", ["none", "rogue"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    serve: Serve, certs: Certs, server_logs: LogTap, client: str
) -> None:
    st = tls_server(serve, certs, tls_client_ca=certs.ca)
    opts: dict[str, Any] = {}
    if client == "rogue":
        opts = {"tls_cert": certs.rogue_cert, "tls_key": certs.rogue_key}
    with pytest.raises((sockserve.ConnectError, sockserve.ConnectionClosed)):
        tls_request(st.url("tls"), certs, **opts)
    server_logs.wait_for("failed during setup: TLS")
    wait_for(lambda: st.server.conn_count == 0, what="the refused connection to be released")
    reply = tls_request(st.url("tls"), certs, tls_cert=certs.client_cert, tls_key=certs.client_key)
    assert reply.endswith(b"secret")


@pytest.mark.parametrize("garbage", ["plaintext", "random"])
def test_non_tls_bytes_on_the_tls_port_close_only_that_connection(
    serve: Serve, certs: Certs, server_logs: LogTap, garbage: str
) -> None:
    st = tls_server(serve, certs)
    addr = addr_of(st.url("tls"))
    rng = random.Random("tls-garbage")
    with socket.create_connection(addr, timeout=5) as bystander_raw:
        bystander = sockserve.connect(st.url("tls"), tls_ca=certs.ca, timeout=5)
        try:
            assert bystander.request(b"before").endswith(b"before")
            for i in range(20):
                with socket.create_connection(addr, timeout=5) as s:
                    if garbage == "plaintext":
                        s.sendall(b"GET / HTTP/1.0\r\n\r\nhello %d\n" % i)
                    else:
                        s.sendall(rng.randbytes(rng.randint(1, 4096)))
                    if i % 4 == 3:
                        reset(s)
                    else:
                        assert closed_by_peer(s), "the TLS port kept a garbage connection open"
            assert bystander.request(b"after").endswith(b"after"), "a bystander was harmed"
        finally:
            bystander.close()
        del bystander_raw
    wait_for(lambda: st.server.conn_count == 0 and st.server.streams[0].pending == 0)
    assert server_logs.count("failed during setup") >= 15
    assert server_logs.errors() == []
    assert tls_request(st.url("tls"), certs).endswith(b"secret")


def test_silent_client_on_the_tls_port_is_dropped_at_the_handshake_timeout(
    serve: Serve, certs: Certs
) -> None:
    st = tls_server(serve, certs, tls_handshake_timeout=0.3)
    with socket.create_connection(addr_of(st.url("tls")), timeout=5) as s:
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert closed_by_peer(s, timeout=5), "a stalled TLS handshake was never dropped"
    wait_for(lambda: st.server.conn_count == 0)
    assert tls_request(st.url("tls"), certs).endswith(b"secret")


def test_cli_mutual_tls_serve_and_call(certs: Certs) -> None:
    with LoggedServer(
        "--listen",
        "tls://127.0.0.1:0",
        "--tls-cert",
        certs.server_cert,
        "--tls-key",
        certs.server_key,
        "--tls-client-ca",
        certs.ca,
    ) as srv:
        url = srv.url("tls")
        ok = run_cli(
            "call", url, "hi", "--tls-ca", certs.ca, "--tls-cert", certs.client_cert,
            "--tls-key", certs.client_key,
        )  # fmt: skip
        assert ok.returncode == 0 and ok.stdout.endswith(b"] hi\n"), ok
        refused = run_cli("call", url, "hi", "--tls-ca", certs.ca)
        # TLS 1.3: the server checks the client's certificate after the client's side of
        # the handshake is done, so the refusal reaches the client as a close before the
        # reply: exit 5 (3 would claim the server was unreachable).
        assert refused.returncode == 5, refused
        assert refused.stderr == (
            f"sockserve call: {url}: server closed the connection before replying\n".encode()
        )
        assert b"Traceback" not in refused.stderr
        unverified = run_cli("call", url, "hi")  # our CA is not a system CA
        assert unverified.returncode == 3 and b"TLS handshake failed" in unverified.stderr
        srv.wait_line("failed during setup: TLS", count=1)
        assert srv.proc.poll() is None


def test_cli_tls_without_a_certificate_is_a_usage_error() -> None:
    done = run_cli("serve", "--listen", "tls://127.0.0.1:0")
    assert done.returncode == 2 and b"tls:// endpoints need --tls-cert" in done.stderr
