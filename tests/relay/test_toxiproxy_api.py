"""Toxiproxy's HTTP API (``relay/api.py``) on real loopback sockets, driven with http.client.

Each expectation is Toxiproxy 2.12's (``api.go``, ``proxy.go``, ``toxic_collection.go``):
status codes, JSON shapes and what a proxy does when it is disabled, moved or reset. The
proxies relay to a real timestamp server, so "it works" means bytes crossed the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import check_stamp, wait_for

from sockserve.relay.api import MAX_BODY, ApiThread
from sockserve.server import ServerThread

Reply = tuple[int, dict[str, str], Any]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A timestamp server: what every proxy here relays to (``HOST:PORT``, as Toxiproxy)."""
    with ServerThread("timestamp", "tcp://127.0.0.1:0") as st:
        yield f"127.0.0.1:{st.endpoints[0].port}"


@pytest.fixture
def api() -> Iterator[ApiThread]:
    with ApiThread() as api:
        yield api


def call(api: ApiThread, method: str, path: str, body: Any = None, **headers: str) -> Reply:
    """One request on a fresh connection: status, headers (lower-case names), decoded body."""
    assert api.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", api.server.endpoint.port, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        heads = {k.lower(): v for k, v in resp.getheaders()}
        if heads.get("content-type", "").startswith("application/json"):
            return resp.status, heads, json.loads(raw)
        return resp.status, heads, raw
    finally:
        conn.close()


def addr(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def round_trip(listen: str, message: bytes = b"hello\n") -> bytes:
    with socket.create_connection(addr(listen), timeout=10) as s:
        s.sendall(message)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, f"connection through {listen} closed after {reply!r}"
            reply += chunk
    check_stamp(reply, message)
    return reply


def refused(listen: str) -> bool:
    try:
        socket.create_connection(addr(listen), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def create(api: ApiThread, upstream: str, name: str = "ts", **fields: Any) -> dict[str, Any]:
    body = {"name": name, "listen": "127.0.0.1:0", "upstream": upstream, **fields}
    status, _, proxy = call(api, "POST", "/proxies", body)
    assert status == 201, proxy
    assert isinstance(proxy, dict)
    return proxy


def test_version_is_toxiproxy_2_12(api: ApiThread) -> None:
    status, heads, body = call(api, "GET", "/version")
    assert status == 200
    assert heads["content-type"] == "application/json;charset=utf-8"
    assert body == {"version": "2.12.0"}


def test_create_relays_and_reports_the_real_port(api: ApiThread, upstream: str) -> None:
    proxy = create(api, upstream)
    assert proxy["name"] == "ts" and proxy["upstream"] == upstream
    assert proxy["enabled"] is True and proxy["toxics"] == []
    host, port = addr(proxy["listen"])
    assert host == "127.0.0.1" and port != 0
    round_trip(proxy["listen"])
    status, _, index = call(api, "GET", "/proxies")
    assert status == 200 and index == {"ts": proxy}
    assert call(api, "GET", "/proxies/ts")[2] == proxy


def test_duplicate_proxy_is_409(api: ApiThread, upstream: str) -> None:
    create(api, upstream)
    status, heads, body = call(
        api, "POST", "/proxies", {"name": "ts", "listen": "127.0.0.1:0", "upstream": upstream}
    )
    assert status == 409
    assert heads["content-type"] == "application/json"
    assert body == {"error": "proxy already exists", "status": 409}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"name": "x", "upstream"', "malformed JSON"),
        (b"", "empty body"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"upstream": "127.0.0.1:1"}', "missing required field: name"),
        (b'{"name": "x"}', "missing required field: upstream"),
        (b'{"name": 5, "upstream": "127.0.0.1:1"}', "'name' must be a string"),
        (b'{"name": "x", "upstream": "127.0.0.1:1", "enabled": "yes"}', "'enabled' must be"),
        (b'{"name": "x", "upstream": "127.0.0.1:1", "listen": "nonsense"}', "missing port"),
        (b'{"name": "x", "upstream": "127.0.0.1:99999"}', "out of range"),
        (b'{"name": "x", "upstream": "exec:sh -c id"}', "exec: targets are not allowed"),
        (b'{"name": "x", "upstream": "udp://127.0.0.1:9"}', "one is a stream endpoint"),
        (b"\xff\xfe{}", "malformed JSON"),
    ],
)
def test_bad_proxy_bodies_are_400_with_a_message(api: ApiThread, body: bytes, says: str) -> None:
    status, _, reply = call(api, "POST", "/proxies", body)
    assert status == 400, reply
    assert reply["status"] == 400 and says in reply["error"], reply
    assert call(api, "GET", "/proxies")[2] == {}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/proxies/nope"),
        ("DELETE", "/proxies/nope"),
        ("POST", "/proxies/nope"),
        ("GET", "/proxies/nope/toxics"),
        ("POST", "/proxies/nope/toxics"),
        ("GET", "/proxies/nope/toxics/latency_downstream"),
    ],
)
def test_unknown_proxy_is_404(api: ApiThread, method: str, path: str) -> None:
    status, _, body = call(api, method, path, b"{}" if method == "POST" else None)
    assert status == 404
    assert body == {"error": "proxy not found", "status": 404}


def test_unknown_path_is_404_and_wrong_method_405(api: ApiThread) -> None:
    assert call(api, "GET", "/nothing/here")[0] == 404
    assert call(api, "GET", "/proxies/a/b/c/d/e")[0] == 404
    status, heads, body = call(api, "PUT", "/proxies")
    assert status == 405 and heads["allow"] == "GET, POST"
    assert body["status"] == 405 and "PUT" in body["error"]
    assert call(api, "GET", "/reset")[0] == 405
    assert call(api, "DELETE", "/version")[0] == 405


def test_a_browser_is_refused_as_toxiproxy_does(api: ApiThread) -> None:
    status, _, body = call(api, "GET", "/proxies", **{"User-Agent": "Mozilla/5.0 (X11)"})
    assert status == 403 and body == b"User agent not allowed\n"


def test_toxics_crud(api: ApiThread, upstream: str) -> None:
    create(api, upstream)
    latency = {"type": "latency", "attributes": {"latency": 100}}
    status, _, toxic = call(api, "POST", "/proxies/ts/toxics", latency)
    assert status == 200  # Toxiproxy answers a new toxic with 200, not 201
    assert toxic == {
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"latency": 100, "jitter": 0},
    }
    assert call(api, "POST", "/proxies/ts/toxics", latency)[:3:2] == (
        409,
        {"error": "toxic already exists", "status": 409},
    )
    up = {"type": "bandwidth", "stream": "upstream", "name": "slow", "attributes": {"rate": 64}}
    assert call(api, "POST", "/proxies/ts/toxics", up)[0] == 200
    status, _, listed = call(api, "GET", "/proxies/ts/toxics")
    assert status == 200 and [t["name"] for t in listed] == ["slow", "latency_downstream"]
    assert call(api, "GET", "/proxies/ts")[2]["toxics"] == listed
    update = {"attributes": {"jitter": 5}, "toxicity": 0.5}
    status, _, changed = call(api, "PATCH", "/proxies/ts/toxics/latency_downstream", update)
    assert status == 200
    assert changed["attributes"] == {"latency": 100, "jitter": 5} and changed["toxicity"] == 0.5
    assert call(api, "GET", "/proxies/ts/toxics/latency_downstream")[2] == changed
    assert call(api, "POST", "/proxies/ts/toxics/slow", {"attributes": {"rate": 32}})[0] == 200
    assert call(api, "DELETE", "/proxies/ts/toxics/slow")[0] == 204
    missing = {"error": "toxic not found", "status": 404}
    assert call(api, "DELETE", "/proxies/ts/toxics/slow")[::2] == (404, missing)
    assert call(api, "GET", "/proxies/ts/toxics/slow")[::2] == (404, missing)
    assert call(api, "POST", "/proxies/ts/toxics/slow", {"toxicity": 1})[::2] == (404, missing)
    assert [t["name"] for t in call(api, "GET", "/proxies/ts/toxics")[2]] == ["latency_downstream"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"type": "nope"}, "nope"),
        ({"attributes": {}}, "type"),
        ({"type": "latency", "stream": "sideways"}, "stream was invalid"),
        ({"type": "latency", "attributes": {"latency": -1}}, "latency"),
        ({"type": "latency", "attributes": {"colour": 1}}, "colour"),
        ({"type": "latency", "toxicity": 2}, "toxicity"),
        ({"type": "drop", "attributes": {"probability": 0.5}}, "drop"),
        (b"{", "malformed JSON"),
    ],
)
def test_bad_toxics_are_400(api: ApiThread, upstream: str, body: Any, says: str) -> None:
    create(api, upstream)
    status, _, reply = call(api, "POST", "/proxies/ts/toxics", body)
    assert status == 400, reply
    assert reply["status"] == 400 and says in reply["error"], reply
    assert call(api, "GET", "/proxies/ts/toxics")[2] == []


def test_disable_closes_the_listener_and_open_connections(api: ApiThread, upstream: str) -> None:
    proxy = create(api, upstream)
    listen = proxy["listen"]
    with socket.create_connection(addr(listen), timeout=10) as open_conn:
        open_conn.sendall(b"before\n")
        check_stamp(open_conn.recv(4096), b"before\n")
        status, _, off = call(api, "POST", "/proxies/ts", {"enabled": False})
        assert status == 200 and off["enabled"] is False and off["listen"] == listen
        with contextlib.suppress(ConnectionResetError):  # a reset is closed too
            assert open_conn.recv(4096) == b""
    assert refused(listen)
    status, _, on = call(api, "POST", "/proxies/ts", {"enabled": True})
    assert status == 200 and on["enabled"] is True
    assert on["listen"] == listen  # the same port again, as Toxiproxy keeps its address
    round_trip(listen)


def test_update_moves_the_listener(api: ApiThread, upstream: str) -> None:
    old = create(api, upstream)["listen"]
    status, _, moved = call(api, "POST", "/proxies/ts", {"listen": "127.0.0.1:0"})
    assert status == 200 and moved["enabled"] is True and moved["listen"] != old
    assert refused(old)
    round_trip(moved["listen"])
    status, _, reply = call(api, "POST", "/proxies/ts", {"upstream": "exec:true"})
    assert status == 400 and "exec" in reply["error"]
    round_trip(moved["listen"])  # a bad update stops nothing


def test_delete_stops_the_proxy(api: ApiThread, upstream: str) -> None:
    listen = create(api, upstream)["listen"]
    status, _, body = call(api, "DELETE", "/proxies/ts")
    assert status == 204 and body == b""
    assert refused(listen)
    assert call(api, "GET", "/proxies")[2] == {}


def test_reset_enables_every_proxy_and_removes_every_toxic(api: ApiThread, upstream: str) -> None:
    a = create(api, upstream, "a")["listen"]
    create(api, upstream, "b", enabled=False)
    call(api, "POST", "/proxies/a/toxics", {"type": "latency", "attributes": {"latency": 10}})
    call(api, "POST", "/proxies/a", {"enabled": False})
    status, _, body = call(api, "POST", "/reset")
    assert status == 204 and body == b""
    index = call(api, "GET", "/proxies")[2]
    assert {n: (p["enabled"], p["toxics"]) for n, p in index.items()} == {
        "a": (True, []),
        "b": (True, []),
    }
    round_trip(a)
    round_trip(index["b"]["listen"])


def test_populate_adds_keeps_and_replaces(api: ApiThread, upstream: str) -> None:
    wanted = [
        {"name": "a", "listen": "127.0.0.1:0", "upstream": upstream},
        {"name": "b", "listen": "127.0.0.1:0", "upstream": upstream, "enabled": False},
    ]
    status, _, body = call(api, "POST", "/populate", wanted)
    assert status == 201
    made = {p["name"]: p for p in body["proxies"]}
    assert made["a"]["enabled"] is True and made["b"]["enabled"] is False
    round_trip(made["a"]["listen"])
    # The same listen and upstream again: kept as it is (port, toxics and all).
    call(api, "POST", "/proxies/a/toxics", {"type": "latency"})
    again = [{"name": "a", "listen": made["a"]["listen"], "upstream": upstream}]
    status, _, body = call(api, "POST", "/populate", again)
    assert status == 201 and body["proxies"] == [call(api, "GET", "/proxies/a")[2]]
    assert body["proxies"][0]["toxics"] != []
    # A different upstream: replaced (a new proxy, no toxics).
    other = [{"name": "a", "listen": "127.0.0.1:0", "upstream": "localhost:" + upstream[10:]}]
    status, _, body = call(api, "POST", "/populate", other)
    assert status == 201 and body["proxies"][0]["toxics"] == []
    assert refused(made["a"]["listen"])
    round_trip(body["proxies"][0]["listen"])


def test_populate_checks_every_entry_before_making_any(api: ApiThread, upstream: str) -> None:
    wanted = [{"name": "ok", "upstream": upstream}, {"name": "bad"}]
    status, _, body = call(api, "POST", "/populate", wanted)
    assert status == 400 and body["error"] == "missing required field: upstream at proxy 2"
    assert call(api, "GET", "/proxies")[2] == {}
    assert call(api, "POST", "/populate", {"name": "x"})[0] == 400


def test_populate_reports_what_it_made_before_a_failure(api: ApiThread, upstream: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        wanted = [
            {"name": "first", "listen": "127.0.0.1:0", "upstream": upstream},
            {"name": "second", "listen": busy, "upstream": upstream},
        ]
        status, _, body = call(api, "POST", "/populate", wanted)
        assert status == 500 and body["status"] == 500 and busy in body["error"]
        assert [p["name"] for p in body["proxies"]] == ["first"]
        status, _, body = call(api, "POST", "/proxies", {**wanted[1], "name": "third"})
        assert status == 500 and "in use" in body["error"]


def test_unix_listen_is_an_extension(api: ApiThread, upstream: str, sock_dir: Path) -> None:
    path = sock_dir / "ts.sock"
    proxy = create(api, upstream, listen=f"unix://{path}")
    assert proxy["listen"] == f"unix://{path}"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"unix\n")
        check_stamp(s.recv(4096), b"unix\n")


def test_latency_toxic_adds_its_delay(api: ApiThread, upstream: str) -> None:
    listen = create(api, upstream)["listen"]
    with socket.create_connection(addr(listen), timeout=10) as s:
        s.sendall(b"warm\n")
        check_stamp(s.recv(4096), b"warm\n")
        start = time.monotonic()
        s.sendall(b"plain\n")
        check_stamp(s.recv(4096), b"plain\n")
        plain = time.monotonic() - start
        call(api, "POST", "/proxies/ts/toxics", {"type": "latency", "attributes": {"latency": 100}})
        start = time.monotonic()
        s.sendall(b"slow\n")
        check_stamp(s.recv(4096), b"slow\n")
        slow = time.monotonic() - start
    # A behaviour, not a speed: the toxic adds its 100 ms (generous bounds, a loaded machine).
    assert 0.095 <= slow - plain < 0.4, (plain, slow)


# -- hostile HTTP clients: each costs one connection, never the API or the relays ------------


def raw_exchange(api: ApiThread, data: bytes) -> bytes:
    assert api.server is not None
    with socket.create_connection(("127.0.0.1", api.server.endpoint.port), timeout=10) as s:
        s.sendall(data)
        return recv_until_closed(s)


def recv_until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_garbage_is_400_and_closed(api: ApiThread) -> None:
    reply = raw_exchange(api, b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b'"status":400' in reply
    assert call(api, "GET", "/version")[0] == 200


def test_oversized_bodies_are_413(api: ApiThread) -> None:
    big = b"POST /proxies HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1)
    assert raw_exchange(api, big).startswith(b"HTTP/1.1 413 ")
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    chunked = b"POST /populate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    chunked += chunk * (MAX_BODY // (64 * 1024) + 2)
    assert api.server is not None
    with socket.create_connection(("127.0.0.1", api.server.endpoint.port), timeout=10) as s:
        # It may answer and close before we finish sending: that is the point.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(chunked)
        reply = recv_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:80]
    # A head over the cap still arriving (h11 caps what it buffers, not a head read whole).
    assert api.server is not None
    with socket.create_connection(("127.0.0.1", api.server.endpoint.port), timeout=10) as s:
        s.sendall(b"GET /version HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 64 * 1024)
        assert recv_until_closed(s).startswith(b"HTTP/1.1 431 ")


def test_pipelined_requests_are_answered_in_order(api: ApiThread, upstream: str) -> None:
    create(api, upstream)
    one = b"GET /version HTTP/1.1\r\nhost: x\r\n\r\n"
    two = b"GET /proxies/ts HTTP/1.1\r\nhost: x\r\n\r\n"
    last = b"GET /proxies/nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    reply = raw_exchange(api, one + two + last)
    assert reply.count(b"HTTP/1.1 ") == 3
    assert reply.index(b"2.12.0") < reply.index(b'"name":"ts"') < reply.index(b"proxy not found")


def test_a_stalled_client_blocks_nobody_and_is_timed_out(api: ApiThread, upstream: str) -> None:
    assert api.server is not None
    api.server.read_timeout = 0.5
    listen = create(api, upstream)["listen"]
    with socket.create_connection(("127.0.0.1", api.server.endpoint.port), timeout=10) as slow:
        slow.sendall(b"POST /proxies HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        assert call(api, "GET", "/proxies/ts")[0] == 200  # served meanwhile
        round_trip(listen)  # and the relay too
        started = time.monotonic()
        assert recv_until_closed(slow) == b""  # closed, unanswered, by the read timeout
        assert time.monotonic() - started < 5
    wait_for(lambda: len(api.server.conns) == 0 if api.server else True, what="conn freed")


def udp_reply(listen: str, message: bytes, timeout: float) -> bytes | None:
    host, port = addr(listen.removeprefix("udp://"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(message, (host, port))
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def test_udp_proxy_with_a_datagram_toxic(api: ApiThread) -> None:
    with ServerThread("timestamp", "udp://127.0.0.1:0") as st:
        target = st.endpoints[0].url()
        proxy = create(api, target, "dns", listen="udp://127.0.0.1:0")
        assert proxy["listen"].startswith("udp://127.0.0.1:") and proxy["upstream"] == target
        reply = udp_reply(proxy["listen"], b"dgram", 10)
        assert reply is not None
        check_stamp(reply, b"dgram")
        status, _, body = call(api, "POST", "/proxies/dns/toxics", {"type": "limit_data"})
        assert status == 400 and "stream" in body["error"]
        drop = {"type": "drop", "stream": "upstream", "attributes": {"probability": 1.0}}
        assert call(api, "POST", "/proxies/dns/toxics", drop)[0] == 200
        assert udp_reply(proxy["listen"], b"lost", 0.5) is None  # every datagram dropped
        assert call(api, "POST", "/reset")[0] == 204
        reply = udp_reply(proxy["listen"], b"back", 10)
        assert reply is not None
        check_stamp(reply, b"back")


def test_an_adopted_relay_is_driven_like_the_others(api: ApiThread, upstream: str) -> None:
    """The command line's ``LISTEN TARGET`` relay, shown to the API (``Proxies.adopt``)."""
    from sockserve.relay import Relay

    async def adopt() -> str:
        relay = Relay("tcp://127.0.0.1:0", upstream, max_conns=3, connect_timeout=2.5)
        await relay.start()
        return api.proxies.adopt("relay", relay).listen

    listen = asyncio.run_coroutine_threadsafe(adopt(), api.loop).result(10)
    assert call(api, "GET", "/proxies")[2] == {
        "relay": {
            "name": "relay",
            "listen": listen,
            "upstream": f"tcp://{upstream}",
            "enabled": True,
            "toxics": [],
        }
    }
    round_trip(listen)
    assert call(api, "POST", "/proxies/relay", {"enabled": False})[0] == 200
    assert refused(listen)
    assert call(api, "POST", "/proxies/relay", {"enabled": True})[0] == 200
    round_trip(listen)
    again = api.proxies.get("relay").relay  # a new Relay (one runs once), set as the first
    assert again is not None and again.config.max_conns == 3
    assert again.link.origin.connect_timeout == 2.5
