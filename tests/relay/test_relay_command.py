"""``sockserve relay`` as users run it, and the relay between real third-party peers:
``openssl s_client`` against a TLS-terminating relay, HAProxy's ``accept-proxy`` behind
``--send-proxy-v2``, the command line's errors, toxics and metrics.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import HAProxy, haproxy_path, listening_socket, whoami
from relay_helpers import connect, read_to_eof
from strict import needs
from support import SOCKSERVE, ServerProcess, free_port, run_cli

from sockserve.relay import RelayThread
from sockserve.server import ServerThread

Serve = Callable[..., ServerThread]
StartRelay = Callable[..., RelayThread]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "missing LISTEN and TARGET"),
        (("tcp://127.0.0.1:0",), "missing TARGET after LISTEN tcp://127.0.0.1:0"),
        (("tcp://127.0.0.1", "127.0.0.1:9"), "missing port"),
        (("tcp://127.0.0.1:0", "ftp://x:1"), "unknown scheme 'ftp'"),
        (("tcp://127.0.0.1:0", "127.0.0.1:0"), "needs a real host and port"),
        (("tcp://127.0.0.1:0", "exec:"), "no command after exec:"),
        (("tcp://127.0.0.1:0", "exec:'unclosed"), "No closing quotation"),
        (("udp://127.0.0.1:0", "tcp://127.0.0.1:9"), "is a datagram endpoint"),
        (("tcp://127.0.0.1:0", "127.0.0.1:9", "--toxic", "lag=1"), "lag"),
        (("tcp://127.0.0.1:0", "127.0.0.1:9", "--tls-ca", "/nonexistent"), "--tls-ca"),
        (("tcp://127.0.0.1:0", "127.0.0.1:9", "--max-conns", "x"), "--max-conns"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    if "--tls-ca" in args:
        args = (args[0], "tls://127.0.0.1:9", *args[2:])
    proc = run_cli("relay", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("sockserve relay: "), err
    assert message in err, err


def test_relay_command_relays_with_a_toxic_and_serves_metrics(serve: Serve) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    port = free_port()
    argv = [*SOCKSERVE, "relay", "tcp://127.0.0.1:0", srv.url("tcp")]
    argv += ["--toxic", "latency=20", "--metrics", f"127.0.0.1:{port}"]
    with ServerProcess(argv=argv, graceful=True) as relay:
        relay.wait_line("metrics")
        with connect(relay.endpoints[0]) as c:
            c.sendall(b"via the command")
            assert c.recv(100) == b"via the command"
            c.shutdown(socket.SHUT_WR)
            assert read_to_eof(c) == b""
        relay.wait_line("close")
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = page.decode()
        assert 'sockserve_relay_bytes_total{direction="upstream"' in text
        up = [ln for ln in text.splitlines() if ln.startswith("sockserve_relay_bytes_total")]
        assert all(ln.endswith(" 15.0") for ln in up), up
        assert "sockserve_relay_connections_total" in text
        assert "sockserve_relay_toxics_applied_total{" in text
        code, log = relay.stop()
    assert code == 0, log


@needs(shutil.which("openssl"), "the openssl CLI (Debian package openssl)")
def test_openssl_s_client_through_a_tls_terminating_relay(
    sockserve_relay: StartRelay, serve: Serve, certs: Any
) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(
        srv.url("tcp"),
        listen="tls://127.0.0.1:0",
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
    )
    port = relay.endpoints[0].port
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", certs.ca]
    argv += ["-verify_return_error", "-quiet"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"hello through TLS\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"hello through TLS\n"
    finally:
        proc.kill()
        proc.wait(10)


@needs(haproxy_path(), "haproxy not installed (Debian package haproxy)")
def test_send_proxy_v2_is_accepted_by_haproxy_accept_proxy(
    sockserve_relay: StartRelay, serve: Serve, tmp_path: Path
) -> None:
    """client (127.0.0.3) -> relay --send-proxy-v2 -> HAProxy accept-proxy -> send-proxy-v2
    -> a server that shows the client it believes in: the relay's header carried it."""
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True)
    fe = listening_socket()
    cfg = f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
frontend fe
    bind fd@{fe.fileno()} accept-proxy
    default_backend be
backend be
    server s1 127.0.0.1:{srv.endpoints[0].port} send-proxy-v2
"""
    fe_port = fe.getsockname()[1]
    with HAProxy(tmp_path, cfg, [fe.fileno()]):
        fe.close()
        relay = sockserve_relay(f"127.0.0.1:{fe_port}", send_proxy=2)
        rport = relay.endpoints[0].port
        with socket.create_connection(
            ("127.0.0.1", rport), timeout=10, source_address=("127.0.0.3", 0)
        ) as c:
            c.sendall(b"who")
            reply = c.recv(4096).split()
            client_port = c.getsockname()[1]
    assert reply[0] == b"127.0.0.3", reply
    assert int(reply[1]) == client_port
    assert reply[-1] == b"who"


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    import json
    import urllib.error

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_api_alone_creates_proxies_that_relay(serve: Serve) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    api = free_port()
    argv = [*SOCKSERVE, "relay", "--api", f"127.0.0.1:{api}"]
    with ServerProcess(argv=argv, ready=0, graceful=True) as proc:
        proc.wait_line(f"127.0.0.1:{api}")
        base = f"http://127.0.0.1:{api}"
        status, body = _http(
            "POST",
            f"{base}/proxies",
            {"name": "echo", "listen": "127.0.0.1:0", "upstream": srv.url("tcp")[6:]},
        )
        assert status == 201, body
        listen = body["listen"]
        with connect(f"tcp://{listen}") as c:
            c.sendall(b"made by the API")
            assert c.recv(100) == b"made by the API"
        code, log = proc.stop()
    assert code == 0, log


def test_api_beside_a_command_line_relay_shows_it_as_proxy_relay(serve: Serve) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    api = free_port()
    argv = [*SOCKSERVE, "relay", "tcp://127.0.0.1:0", srv.url("tcp"), "--api", f"127.0.0.1:{api}"]
    with ServerProcess(argv=argv, graceful=True) as proc:
        proc.wait_line(f"127.0.0.1:{api}")
        base = f"http://127.0.0.1:{api}"
        status, proxies = _http("GET", f"{base}/proxies")
        assert status == 200 and "relay" in proxies, proxies
        status, toxic = _http(
            "POST",
            f"{base}/proxies/relay/toxics",
            {"type": "latency", "attributes": {"latency": 50}},
        )
        assert status == 200, toxic
        with connect(proc.endpoints[0]) as c:
            import time

            started = time.perf_counter()
            c.sendall(b"slowed by the API")
            assert c.recv(100) == b"slowed by the API"
            assert time.perf_counter() - started >= 0.045
        code, log = proc.stop()
    assert code == 0, log


def test_udp_relay_command(serve: Serve) -> None:
    srv = serve("echo", "udp://127.0.0.1:0")
    argv = [*SOCKSERVE, "relay", "udp://127.0.0.1:0", srv.url("udp")]
    with ServerProcess(argv=argv, graceful=True) as proc:
        host, port = proc.endpoints[0][6:].rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(10)
            u.sendto(b"datagram", (host, int(port)))
            assert u.recv(100) == b"datagram"
        code, log = proc.stop()
    assert code == 0, log


def test_sighup_is_logged_and_never_kills_the_relay(serve: Serve) -> None:
    """``systemctl reload`` or logrotate sends SIGHUP; its default action kills. The relay
    has nothing to reload: it logs that, and goes on relaying."""
    srv = serve("echo", "tcp://127.0.0.1:0")
    argv = [*SOCKSERVE, "relay", "tcp://127.0.0.1:0", srv.url("tcp")]
    with ServerProcess(argv=argv, graceful=True) as relay:
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_line("SIGHUP: ignored")
        with connect(relay.endpoints[0]) as c:
            c.sendall(b"after the hangup")
            assert c.recv(100) == b"after the hangup"
        assert relay.proc.poll() is None
        code, log = relay.stop()
    assert code == 0, log
