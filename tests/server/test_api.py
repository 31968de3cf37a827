"""The Python API: blocking and asyncio clients, the server object, sockserve.serve()."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from support import check_stamp

import sockserve
from sockserve.server import Server, ServerThread, make_binding


@pytest.mark.parametrize("framing", ["raw", "line", "length"])
def test_connect_reusable(serve: Callable[..., ServerThread], framing: str) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", framing=framing)
    with sockserve.connect(st.url("tcp"), framing=framing) as c:
        for msg in (b"one", b"two", b"three"):
            check_stamp(c.request(msg), msg)


def test_connect_every_transport(serve: Callable[..., ServerThread], sock_dir: Path) -> None:
    st = serve(
        "timestamp",
        "tcp://127.0.0.1:0",
        "udp://127.0.0.1:0",
        f"unix://{sock_dir}/a.sock",
        f"unixgram://{sock_dir}/b.sock",
    )
    for ep in st.endpoints:
        with sockserve.connect(ep) as c:
            check_stamp(c.request(b"via " + ep.scheme.encode()), b"via " + ep.scheme.encode())


def test_client_errors_are_typed() -> None:
    with pytest.raises(sockserve.ConnectError) as info:
        sockserve.connect("unix:///nonexistent/x.sock")
    assert info.value.endpoint == "unix:///nonexistent/x.sock"
    with pytest.raises(sockserve.EndpointError):
        sockserve.connect("nope")


def test_aconnect(serve: Callable[..., ServerThread], sock_dir: Path) -> None:
    st = serve(
        "timestamp",
        "tcp://127.0.0.1:0",
        "udp://127.0.0.1:0",
        f"unix://{sock_dir}/a.sock",
        f"unixgram://{sock_dir}/b.sock",
        framing="line",
    )

    async def main() -> None:
        for ep in st.endpoints:
            async with sockserve.aconnect(ep, framing="line") as c:
                for msg in (b"a", b"b"):
                    check_stamp(await c.request(msg), msg)
        client = await sockserve.aconnect(st.endpoints[0], framing="line")
        check_stamp(await client.request(b"awaited"), b"awaited")
        await client.close()

    asyncio.run(main())


def test_aconnect_refused() -> None:
    async def main() -> None:
        with pytest.raises(sockserve.ConnectError):
            await sockserve.aconnect("tcp://127.0.0.1:1")

    asyncio.run(main())


def test_server_object_async_start_stop() -> None:
    def upper(request: bytes, ctx: sockserve.Context) -> bytes:
        return request.upper()

    async def main() -> None:
        server = Server(make_binding(upper, ["tcp://127.0.0.1:0"]))
        await server.start()
        ep = server.endpoints[0]
        assert ep.port != 0
        async with sockserve.aconnect(ep) as c:
            assert await c.request(b"abc") == b"ABC"
        await server.stop()
        with pytest.raises(sockserve.ConnectError):
            await sockserve.aconnect(ep)

    asyncio.run(main())


def test_server_thread_bind_error_propagates() -> None:
    with ServerThread(Server(make_binding("timestamp", ["tcp://127.0.0.1:0"]))) as st:
        second = ServerThread(Server(make_binding("timestamp", [st.url()])))
        with pytest.raises(sockserve.EndpointError):
            second.start()


def test_serve_function_until_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import sockserve

            def handler(request, ctx):
                return b"ok:" + request

            sys.exit(sockserve.serve(handler, "tcp://127.0.0.1:0", framing="line"))
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        # sockserve.serve logs nothing unless logging is configured; find the port via /proc.
        from support import wait_for

        port: list[int] = []

        def find_port() -> bool:
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                parts = line.split()
                inode = parts[9]
                if parts[3] == "0A" and inode_of(proc.pid, inode):
                    port.append(int(parts[1].split(":")[1], 16))
                    return True
            return False

        wait_for(find_port, 10, "the serve() process to listen")
        with sockserve.connect(f"tcp://127.0.0.1:{port[0]}", framing="line") as c:
            assert c.request(b"x") == b"ok:x"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def inode_of(pid: int, inode: str) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(p.readlink().name == f"socket:[{inode}]" for p in fd_dir.iterdir())
    except OSError:
        return False
