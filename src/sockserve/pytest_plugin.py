"""pytest fixtures for testing your own services; pytest loads this through the ``pytest11`` entry point.

It is imported at the start of every pytest run of every project that has sockserve
installed, so it imports nothing of sockserve's own until a test asks for a fixture.

    def test_upper(sockserve_server):
        srv = sockserve_server(lambda request, ctx: request.upper(), framing="line")
        with sockserve.connect(srv.url(), framing="line") as c:
            assert c.request(b"hi") == b"HI"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .relay.runner import RelayThread
    from .server.thread import ServerThread

#: Where a server started by the fixture listens when the test names no URL: loopback,
#: and a port the kernel picks, so tests never collide (read it from ``srv.url()``).
DEFAULT_TEST_URL = "tcp://127.0.0.1:0"


@pytest.fixture
def sockserve_server() -> Iterator[Callable[..., ServerThread]]:
    """``sockserve_server(handler, *urls, **settings)``: a running server, stopped after the test.

    Takes what :class:`sockserve.ServerThread` takes (a handler, ``Service``, built-in name
    or ``"module:attr"``; URLs, default ``tcp://127.0.0.1:0``; ``ServerConfig`` settings
    such as ``framing="line"``) and returns the started ``ServerThread``: ``srv.url()`` /
    ``srv.endpoints`` hold the real ports. Call it more than once for several servers.
    A bind error or a bad setting raises in the test, naming what failed.
    """
    from .server.thread import ServerThread

    started: list[ServerThread] = []

    def start(handler: Any, /, *urls: Any, **settings: Any) -> ServerThread:
        srv = ServerThread(handler, *(urls or (DEFAULT_TEST_URL,)), **settings)
        srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def sockserve_relay() -> Iterator[Callable[..., RelayThread]]:
    """``sockserve_relay(target, toxics=[...], listen="tcp://127.0.0.1:0", **settings)``: a
    running relay in front of ``target``, stopped (every relayed connection closed) after
    the test.

    Takes what :class:`sockserve.relay.RelayThread` takes and returns it started:
    ``relay.url()`` is where to connect instead of ``target``; ``relay.toxics`` holds the
    live toxics, ``relay.stats`` the bytes and connections relayed. Put it between your
    client and a ``sockserve_server`` (or any server) to test how the client copes with
    latency, a slow link or a reset.
    """
    from .relay.runner import RelayThread

    started: list[RelayThread] = []

    def start(
        target: Any, /, toxics: Any = (), listen: str = DEFAULT_TEST_URL, **settings: Any
    ) -> RelayThread:
        relay = RelayThread(listen, target, toxics=toxics, **settings)
        relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in reversed(started):
        relay.stop()
