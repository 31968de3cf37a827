"""Follow-ups on the relay: datagram counters on ``--metrics``, the UDP guards on the
command line, settings a LISTEN cannot honour refused, the public API's names, and a reply
still in flight after the client's FIN across a TLS side (which cannot half-close)."""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SOCKSERVE, ServerProcess, free_port, run_cli, wait_for

from sockserve.cli.relay import add_arguments, build_relays
from sockserve.errors import ConfigError
from sockserve.relay.runner import Relay, RelayThread, metrics_page
from sockserve.server import ServerThread

TIMEOUT = 10.0


class UdpEcho:
    """A textbook UDP echo server in a thread: each datagram back to its sender."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop = True
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho()
    yield echo
    echo.close()


def udp_client(port: int) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(TIMEOUT)
    c.connect(("127.0.0.1", port))
    return c


def series(page: str, name: str) -> dict[str, float]:
    """``name``'s samples on a Prometheus page: the label text (or "") -> value."""
    found: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            labels = head[len(name) :]
            found[labels] = float(value)
    return found


def one(page: str, name: str, having: str = "") -> float:
    hits = [v for k, v in series(page, name).items() if having in k]
    assert len(hits) == 1, (name, having, page)
    return hits[0]


# -- 1. datagram counters on --metrics -------------------------------------------------


def test_metrics_scrape_counts_datagrams_each_way_and_open_flows(udp_echo: UdpEcho) -> None:
    port = free_port()
    argv = [
        *SOCKSERVE,
        "relay",
        "udp://127.0.0.1:0",
        udp_echo.url,
        "--metrics",
        f"127.0.0.1:{port}",
    ]
    with ServerProcess(argv=argv, ready=0, graceful=True) as proc:
        url = proc.wait_log(r"relaying udp://127.0.0.1:(\d+) ->")[0].group(1)
        proc.wait_line("metrics")
        with udp_client(int(url)) as a, udp_client(int(url)) as b:
            for i in range(3):
                a.send(b"a%d" % i)
                assert a.recv(100) == b"a%d" % i
            b.send(b"b")
            assert b.recv(100) == b"b"
            raw = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT)
            page = raw.read().decode()
        assert one(page, "sockserve_relay_datagrams_total", 'direction="upstream"') == 4
        assert one(page, "sockserve_relay_datagrams_total", 'direction="downstream"') == 4
        assert one(page, "sockserve_relay_open_flows") == 2
        assert one(page, "sockserve_relay_datagrams_dropped_total") == 0
        assert one(page, "sockserve_relay_datagrams_refused_total") == 0
        code, log = proc.stop()
    assert code == 0, log


def test_metrics_page_counts_refused_and_dropped_datagrams() -> None:
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    dead = gone.getsockname()[1]
    gone.close()  # nothing listens there: the kernel answers port unreachable
    # Sources below --udp-min-source-port are dropped: every ephemeral port is below 65535.
    with (
        RelayThread("udp://127.0.0.1:0", f"udp://127.0.0.1:{dead}") as refusing,
        RelayThread(
            "udp://127.0.0.1:0", f"udp://127.0.0.1:{dead}", udp_min_source_port=65535
        ) as guarded,
    ):
        page = metrics_page([refusing.relay, guarded.relay])
        with (
            udp_client(refusing.endpoints[0].port) as c,
            udp_client(guarded.endpoints[0].port) as g,
        ):

            def refused() -> bool:
                c.send(b"anyone?")
                text = page().decode()
                return one(text, "sockserve_relay_datagrams_refused_total", refusing.url()) > 0

            wait_for(refused, what="a refusal counted", timeout=TIMEOUT)
            g.send(b"too low")
            g.send(b"too low again")
            wait_for(
                lambda: (
                    one(page().decode(), "sockserve_relay_datagrams_dropped_total", guarded.url())
                    == 2
                ),
                what="the guarded relay's drops",
                timeout=TIMEOUT,
            )
        text = page().decode()
        assert one(text, "sockserve_relay_datagrams_refused_total", guarded.url()) == 0
        assert one(text, "sockserve_relay_open_flows", guarded.url()) == 0
        assert one(text, "sockserve_relay_open_flows", refusing.url()) == 1


def test_a_stream_relay_has_no_datagram_series() -> None:
    relay = Relay("tcp://127.0.0.1:0", "tcp://127.0.0.1:9")
    text = metrics_page([relay])().decode()
    assert series(text, "sockserve_relay_open_flows") == {}
    assert "sockserve_relay_connections_total" in text


# -- 2. the UDP guards on the command line ------------------------------------------------


def relay_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sockserve relay")
    add_arguments(parser)
    return parser.parse_intermixed_args(argv)


def test_udp_rate_and_min_source_port_reach_the_datagram_relay(udp_echo: UdpEcho) -> None:
    args = relay_args(
        "udp://127.0.0.1:0", udp_echo.url, "--udp-rate", "7", "--udp-min-source-port", "65535"
    )
    (relay,) = build_relays(args)
    assert relay.config.udp_rate == 7
    assert relay.config.udp_min_source_port == 65535
    with RelayThread(relay) as running:
        dgram = running.relay.datagram
        assert dgram is not None
        assert dgram.guard.rate == 7 and dgram.guard.min_port == 65535
        with udp_client(running.endpoints[0].port) as c:  # an ephemeral port, below 65535
            c.send(b"from a low port")
            wait_for(lambda: dgram.counts.dropped == 1, what="the datagram dropped")
        assert dgram.counts.datagrams_up == 0 and not dgram.flows


def test_udp_options_are_checked_like_serve_does() -> None:
    done = run_cli("relay", "udp://127.0.0.1:0", "udp://127.0.0.1:9", "--udp-rate", "fast")
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.startswith("sockserve relay: --udp-rate") and err.count("\n") == 1, err


# -- 3. settings a LISTEN cannot honour -----------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--send-proxy"], "--send-proxy "),
        (["--send-proxy-v2"], "--send-proxy-v2 "),
        (["--proxy-protocol"], "--proxy-protocol "),
        (["--tls-cert", "{cert}", "--tls-key", "{key}"], "--tls-cert "),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca "),
    ],
)
@pytest.mark.parametrize("listen", ["udp://127.0.0.1:0", "unixgram://{dir}/relay.sock"])
def test_datagram_listen_refuses_stream_only_settings(
    extra: list[str], option: str, listen: str, certs: Any, tmp_path: Path
) -> None:
    names = {"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca, "dir": tmp_path}
    argv = [a.format(**names) for a in (listen, "udp://127.0.0.1:9", *extra)]
    done = run_cli("relay", *argv)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(f"sockserve relay: {option}"), err
    assert "datagram LISTEN" in err and "Traceback" not in err
    assert not (tmp_path / "relay.sock").exists()  # refused before binding


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"send_proxy": 2}, "--send-proxy-v2"),
        ({"proxy_protocol": True}, "--proxy-protocol"),
    ],
)
def test_relay_api_refuses_them_with_a_config_error(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Relay("udp://127.0.0.1:0", "udp://127.0.0.1:9", **settings)
    Relay("tcp://127.0.0.1:0", "tcp://127.0.0.1:9", **settings)  # a stream LISTEN can


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("tcp://127.0.0.1:0", "udp://127.0.0.1:9"),
        ("tls://127.0.0.1:0", "unixgram:///tmp/x.sock"),
        ("udp://127.0.0.1:0", "tls://127.0.0.1:9"),
        ("udp://127.0.0.1:0", "exec:cat"),
    ],
)
def test_stream_and_datagram_sides_do_not_mix(listen: str, target: str) -> None:
    with pytest.raises(ConfigError, match="endpoint but TARGET"):
        Relay(listen, target)


# -- 4. the public API ----------------------------------------------------------------------


def test_the_api_is_public_from_the_package() -> None:
    import json

    import sockserve.relay as public
    from sockserve.relay import ApiThread, Proxies, serve_api

    assert {"ApiThread", "Proxies", "serve_api", "Toxic", "ToxicSet"} <= set(public.__all__)
    assert all(getattr(public, name) is not None for name in public.__all__)
    assert callable(serve_api) and isinstance(Proxies(), Proxies)
    with (
        ApiThread() as api,
        urllib.request.urlopen(api.url + "/version", timeout=TIMEOUT) as resp,
    ):
        assert resp.status == 200
        assert "version" in json.loads(resp.read())


# -- 5. a reply in flight after the client's FIN, across a TLS side ------------------------


def test_reply_after_shut_wr_arrives_from_a_sockserve_tls_server(certs: Any) -> None:
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
    with (
        ServerThread("echo", "tls://127.0.0.1:0", **tls) as srv,
        RelayThread("tcp://127.0.0.1:0", srv.url("tls"), tls_ca=certs.ca) as relay,
        socket.create_connection(("127.0.0.1", relay.endpoints[0].port), timeout=TIMEOUT) as c,
    ):
        c.sendall(b"asked, then done sending")
        c.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 24:
            chunk = c.recv(100)
            assert chunk, f"EOF after {got!r}: the reply was lost"
            got += chunk
        assert got == b"asked, then done sending"


class LateTlsReplier:
    """A textbook TLS server: reads a request, gives the relay ``grace`` seconds to pass an
    EOF on (a close would end the wait at once), then replies and closes."""

    def __init__(self, certs: Any, grace: float = 0.5) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certs.server_cert, certs.server_key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.grace = grace
        self.saw_eof: bool | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        raw, _ = self.sock.accept()
        with self.ctx.wrap_socket(raw, server_side=True) as conn:
            conn.settimeout(TIMEOUT)
            request = conn.recv(100)
            conn.settimeout(self.grace)
            try:
                self.saw_eof = conn.recv(100) == b""
            except TimeoutError:
                self.saw_eof = False
            except (ssl.SSLError, OSError):
                self.saw_eof = True
            with contextlib.suppress(OSError):
                conn.sendall(b"late reply to " + request)

    def close(self) -> None:
        self.thread.join(TIMEOUT)
        self.sock.close()


def test_reply_written_after_the_relay_had_the_clients_fin_arrives(certs: Any) -> None:
    target = LateTlsReplier(certs)
    with (
        RelayThread("tcp://127.0.0.1:0", target.url, tls_ca=certs.ca) as relay,
        socket.create_connection(("127.0.0.1", relay.endpoints[0].port), timeout=TIMEOUT) as c,
    ):
        c.sendall(b"question")
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(100):  # to EOF: the target's close reaches the client
            got += chunk
    target.close()
    assert got == b"late reply to question"
    assert target.saw_eof is False  # TLS has no half-close: the target is kept open instead


def test_a_silent_tls_target_after_the_fin_ends_by_the_idle_timeout(certs: Any) -> None:
    target = LateTlsReplier(certs, grace=TIMEOUT)  # would wait past the relay's idle timeout
    with (
        RelayThread("tcp://127.0.0.1:0", target.url, tls_ca=certs.ca, idle_timeout=0.3) as relay,
        socket.create_connection(("127.0.0.1", relay.endpoints[0].port), timeout=TIMEOUT) as c,
    ):
        c.sendall(b"anyone?")
        c.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            assert c.recv(100) == b""  # the idle timeout closed it, well before TIMEOUT
        wait_for(lambda: relay.stats.open == 0, what="the relayed connection closed")
    target.close()
    assert target.saw_eof is True  # the target was closed with it
