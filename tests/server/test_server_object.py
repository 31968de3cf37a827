"""The embeddable Server API: ``async with Server(handler, url, **settings)``, serve_forever,
ServerThread(handler, *urls), the old Binding forms, and the errors each raises.

Every check talks to the server over a real loopback socket.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest

import sockserve
from sockserve import service as service_module
from sockserve.server import DEFAULT_URLS, Server, ServerConfig, ServerThread, make_binding

#: Every await on the network in these tests is bounded by this.
TIMEOUT = 10.0


def upper(request: bytes, ctx: sockserve.Context) -> bytes:
    return request.upper()


def refused(url: str) -> bool:
    """True when nothing accepts on ``url`` (a tcp:// URL) any more."""
    ep = sockserve.parse_endpoint(url)
    try:
        socket.create_connection((ep.host, ep.port), timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def test_async_with_binds_serves_and_closes_on_exit() -> None:
    async def main() -> str:
        async with Server(upper, "tcp://127.0.0.1:0", framing="line") as srv:
            (ep,) = srv.endpoints
            assert ep.port != 0
            assert srv.url("tcp") == f"tcp://127.0.0.1:{ep.port}" == srv.url()
            async with sockserve.aconnect(srv.url("tcp"), framing="line") as c:
                assert await asyncio.wait_for(c.request(b"hi"), TIMEOUT) == b"HI"
            return srv.url()

    url = asyncio.run(main())
    assert refused(url)


def test_leaving_the_block_drains_a_request_in_flight() -> None:
    started = asyncio.Event()

    async def slow(request: bytes, ctx: sockserve.Context) -> bytes:
        started.set()
        await asyncio.sleep(0.2)
        return b"done:" + request

    async def main() -> bytes:
        async with Server(slow, "tcp://127.0.0.1:0", framing="line") as srv:
            reader, writer = await asyncio.open_connection(*srv.endpoints[0].address())
            writer.write(b"x\n")
            await asyncio.wait_for(started.wait(), TIMEOUT)
        # Out of the block: stopped, yet the request that was running got its reply.
        reply = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        return reply

    assert asyncio.run(main()) == b"done:x\n"


def test_serve_forever_returns_when_another_task_stops_it() -> None:
    async def main() -> str:
        async with Server(upper, "tcp://127.0.0.1:0", framing="line") as srv:
            forever = asyncio.ensure_future(srv.serve_forever())
            async with sockserve.aconnect(srv.url(), framing="line") as c:
                assert await asyncio.wait_for(c.request(b"a"), TIMEOUT) == b"A"
            assert not forever.done()
            await asyncio.wait_for(srv.stop(), TIMEOUT)
            # stop() returned after the drain, and serve_forever with it.
            await asyncio.wait_for(forever, TIMEOUT)
            assert refused(srv.url())
            return srv.url()

    asyncio.run(main())


def test_serve_forever_cancelled_drains_and_closes() -> None:
    async def main() -> None:
        srv = Server(upper, "tcp://127.0.0.1:0", framing="line")
        forever = asyncio.ensure_future(srv.serve_forever())  # starts it: no async with
        while not srv.endpoints:
            await asyncio.sleep(0.01)
        async with sockserve.aconnect(srv.url(), framing="line") as c:
            assert await asyncio.wait_for(c.request(b"b"), TIMEOUT) == b"B"
        forever.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(forever, TIMEOUT)
        assert refused(srv.url())

    asyncio.run(main())


def test_request_stop_ends_serve_forever_inside_async_with() -> None:
    async def main() -> None:
        async with Server(upper, "tcp://127.0.0.1:0") as srv:
            asyncio.get_running_loop().call_soon(srv.request_stop)
            await asyncio.wait_for(srv.serve_forever(), TIMEOUT)
            assert refused(srv.url())

    asyncio.run(main())


def test_bind_failure_raises_at_aenter() -> None:
    async def main() -> None:
        async with Server(upper, "tcp://127.0.0.1:0") as first:
            second = Server(upper, first.url())
            with pytest.raises(sockserve.EndpointError, match=str(first.endpoints[0].port)):
                async with second:
                    pytest.fail("the block must not run when binding failed")

    asyncio.run(main())


def test_server_thread_takes_a_handler_urls_and_settings(sock_dir: object) -> None:
    with ServerThread(upper, "tcp://127.0.0.1:0", "udp://127.0.0.1:0", framing="line") as st:
        assert [ep.scheme for ep in st.endpoints] == ["tcp", "udp"]
        assert all(ep.port for ep in st.endpoints)
        with sockserve.connect(st.url("tcp"), framing="line") as c:
            assert c.request(b"tcp") == b"TCP"
        with sockserve.connect(st.url("udp")) as c:
            assert c.request(b"udp") == b"UDP"
        url = st.url("tcp")
    assert refused(url)


def test_old_forms_keep_working() -> None:
    cfg = ServerConfig(framing="line", max_conns=3)
    with ServerThread(Server(make_binding(upper, ["tcp://127.0.0.1:0"], cfg))) as st:
        assert st.server.config is cfg  # only Bindings: the first one's config
        assert st.server.max_conns == 3
        with sockserve.connect(st.url(), framing="line") as c:
            assert c.request(b"old") == b"OLD"
    two = Server(
        make_binding(upper, ["tcp://127.0.0.1:0"]),
        make_binding("echo", ["tcp://127.0.0.1:0"]),
        max_conns=7,
        drain_timeout=1.5,
    )
    assert len(two.bindings) == 2
    assert (two.config.max_conns, two.config.drain_timeout) == (7, 1.5)
    assert (two.max_conns, two.drain_timeout) == (7, 1.5)
    with ServerThread(two) as st, sockserve.connect(st.endpoints[1]) as c:
        assert c.request(b"echoed") == b"echoed"


def test_one_service_server_config_is_its_binding_config() -> None:
    base = ServerConfig(idle_timeout=5)
    srv = Server(upper, "tcp://127.0.0.1:0", config=base, framing="length")
    (binding,) = srv.bindings
    assert binding.config == srv.config == base.replace(framing="length")
    assert srv.config.idle_timeout == 5


def test_no_arguments_serve_the_timestamp_service_on_the_default_urls() -> None:
    srv = Server()  # not started: the default port may be in use on this machine
    (binding,) = srv.bindings
    assert binding.service.name == "timestamp"
    assert [ep.url() for ep in binding.endpoints] == list(DEFAULT_URLS)


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: Server(upper, "tcp://127.0.0.1:0", framng="line"), "'framng'"),
        (lambda: Server(upper, "tcp://127.0.0.1:0", max_conns=0), "max conns"),
        (lambda: Server(upper, "tcp://127.0.0.1:0", idle_timeout="x"), "idle_timeout"),
        (lambda: ServerThread(upper, "tcp://127.0.0.1:0", framing="xml"), "xml"),
        (
            lambda: Server(make_binding(upper, ["tcp://127.0.0.1:0"]), framing="line"),
            "framing is a per-service setting",
        ),
        (
            lambda: Server(make_binding(upper, ["tcp://127.0.0.1:0"]), "tcp://127.0.0.1:0"),
            "given after a Binding",
        ),
        (
            lambda: Server(upper, make_binding(upper, ["tcp://127.0.0.1:0"])),
            "Bindings go first",
        ),
        (lambda: ServerThread(Server(upper), framing="line"), "not both"),
        (lambda: Server(upper, "bogus://x"), "bogus"),
    ],
)
def test_bad_settings_raise_config_errors_that_name_them(
    make: Callable[[], object], names: str
) -> None:
    with pytest.raises((sockserve.ConfigError, sockserve.EndpointError), match=names):
        make()


def test_url_of_a_missing_scheme_names_what_is_bound() -> None:
    pattern = r"no udp endpoint; bound: tcp://127\.0\.0\.1:\d+"
    with ServerThread(upper, "tcp://127.0.0.1:0") as st, pytest.raises(LookupError, match=pattern):
        st.url("udp")


def test_ctx_scheme_and_the_deprecated_transport_alias(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(service_module, "_TRANSPORT_WARNED", False)

    def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        seen.append((ctx.scheme, ctx.transport))
        return b"ok"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ServerThread(handler, "tcp://127.0.0.1:0", "udp://127.0.0.1:0") as st:
            for ep in st.endpoints:
                with sockserve.connect(ep) as c:
                    assert c.request(b"1") == b"ok"
                    assert c.request(b"2") == b"ok"
    assert [s for s, _ in seen] == ["tcp", "tcp", "udp", "udp"]
    assert all(s == t for s, t in seen)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, "ctx.transport warns once, not per request"
    assert "ctx.scheme" in str(deprecations[0].message)


def test_every_exported_name_resolves_and_import_loads_nothing_else() -> None:
    for name in sockserve.__all__:
        assert getattr(sockserve, name) is not None, name
    assert set(sockserve.__all__) <= set(dir(sockserve))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sockserve.nope  # noqa: B018
    code = "import sys, sockserve; print(sorted(m for m in sys.modules if 'sockserve' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "['sockserve']"
