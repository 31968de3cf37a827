"""Toxiproxy's own Python client (``toxiproxy-python`` from PyPI, unchanged) driving sockserve.

The client is pointed at ``ApiThread``'s port instead of a Go ``toxiproxy-server``: it
creates a proxy to a real timestamp server, adds a latency toxic of 100 ms and sees the
round trip grow by that much, takes the proxy down and up, resets and destroys, and gets
its own exceptions for sockserve's 409/404/400 answers.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from strict import needs
from support import check_stamp

from sockserve.relay.api import ApiThread
from sockserve.server import ServerThread

try:
    import toxiproxy  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from toxiproxy.api import APIConsumer  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from toxiproxy.exceptions import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        InvalidToxic,
        NotFound,
        ProxyExists,
    )
except ImportError:
    toxiproxy = None

pytestmark = needs(toxiproxy, "toxiproxy-python not installed (pip install toxiproxy-python)")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with ServerThread("timestamp", "tcp://127.0.0.1:0") as st:
        yield f"127.0.0.1:{st.endpoints[0].port}"


@pytest.fixture
def server() -> Iterator[Any]:
    """A ``toxiproxy.Toxiproxy`` talking to sockserve's API (no Go server anywhere)."""
    with ApiThread() as api:
        assert api.server is not None
        client = toxiproxy.Toxiproxy()
        saved = (APIConsumer.host, APIConsumer.port)
        client.update_api_consumer("127.0.0.1", api.server.endpoint.port)
        try:
            yield client
        finally:
            client.update_api_consumer(*saved)


def addr(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def round_trips(listen: str, count: int = 7) -> float:
    """The median round trip of ``count`` timestamp requests on one connection."""
    times = []
    with socket.create_connection(addr(listen), timeout=10) as s:
        for i in range(count + 1):
            message = b"ping %d\n" % i
            start = time.monotonic()
            s.sendall(message)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                assert chunk, f"closed after {reply!r}"
                reply += chunk
            check_stamp(reply, message)
            if i:  # the first one also pays for the connect
                times.append(time.monotonic() - start)
    return statistics.median(times)


def refused(listen: str) -> bool:
    try:
        socket.create_connection(addr(listen), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_latency_toxic_reset_and_destroy(server: Any, upstream: str) -> None:
    assert server.running()
    assert b'"version": "2.12.0"' in server.version()
    proxy = server.create(upstream=upstream, name="ts")
    assert proxy.enabled is True and proxy.upstream == upstream
    assert set(server.proxies()) == {"ts"}
    plain = round_trips(proxy.listen)

    proxy.add_toxic(type="latency", attributes={"latency": 100})
    toxics = proxy.toxics()
    assert list(toxics) == ["latency_downstream"]
    assert toxics["latency_downstream"].attributes == {"latency": 100, "jitter": 0}
    slow = round_trips(proxy.listen)
    # The toxic's own 100 ms, within a few ms either way plus room for a loaded machine.
    assert 0.095 <= slow - plain < 0.2, (plain, slow)

    assert proxy.destroy_toxic("latency_downstream")
    assert proxy.toxics() == {}
    assert round_trips(proxy.listen) < plain + 0.05

    with proxy.down():
        assert server.get_proxy("ts").enabled is False
        assert refused(proxy.listen)
    assert server.get_proxy("ts").enabled is True
    round_trips(proxy.listen, 1)

    proxy.add_toxic(type="latency", name="lag", attributes={"latency": 100})
    proxy.disable()
    assert server.reset()
    again = server.get_proxy("ts")
    assert again.enabled is True and again.listen == proxy.listen
    assert proxy.toxics() == {}
    assert round_trips(proxy.listen) < plain + 0.05

    assert server.destroy(proxy)
    assert server.proxies() == {}
    assert refused(proxy.listen)


def test_the_clients_exceptions_for_409_404_400(server: Any, upstream: str) -> None:
    proxy = server.create(upstream=upstream, name="ts")
    with pytest.raises(ProxyExists):
        APIConsumer.post("/proxies", json={"name": "ts", "upstream": upstream})
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="no_such_toxic")
    with pytest.raises(NotFound):
        proxy.destroy_toxic("never_added")
    assert server.destroy(proxy)
    with pytest.raises(NotFound):
        proxy.destroy()


def test_populate_and_destroy_all(server: Any, upstream: str) -> None:
    wanted = [
        {"name": "one", "upstream": upstream, "listen": "127.0.0.1:0"},
        {"name": "two", "upstream": upstream, "listen": "127.0.0.1:0"},
    ]
    made = server.populate(wanted)
    assert sorted(p.name for p in made) == ["one", "two"]
    for p in made:
        round_trips(p.listen, 1)
    server.destroy_all()
    assert server.proxies() == {}
    assert all(refused(p.listen) for p in made)
