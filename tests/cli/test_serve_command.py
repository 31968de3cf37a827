"""Issue 10, the serve CLI and the Python API: items 17, 24, 25, 28, 29, 30, 31, 32.

Servers run for real (the ``sockserve`` script in a subprocess, or a ServerThread) on
loopback port 0; every wait is bounded.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from support import run_cli

import sockserve
from sockserve.errors import ConfigError, ServiceError
from sockserve.server import Server, ServerConfig, ServerThread, make_binding

REPO = Path(__file__).resolve().parents[2]


def sockserve_script() -> list[str]:
    """The installed ``sockserve`` script (.venv/bin), else the repo's scripts/sockserve.

    Either way Python puts the script's own directory, not the current one, first on
    sys.path: the situation of item 17.
    """
    installed = Path(sys.executable).parent / "sockserve"
    if installed.exists():
        return [str(installed)]
    return [sys.executable, str(REPO / "scripts" / "sockserve")]


class Proc:
    """A command whose stderr is read line by line; ``wait_line`` is the readiness wait."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._pending = b""

    def wait_line(self, needle: str, timeout: float = 15) -> str:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                raw, _, self._pending = self._pending.partition(b"\n")
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if needle in line:
                    return line
            left = deadline - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left))
            chunk = os.read(fd, 65536) if r else b""
            if not chunk:
                raise AssertionError(f"no line with {needle!r}; got:\n" + "\n".join(self.lines))
            self._pending += chunk

    def url(self, scheme: str) -> str:
        line = self.wait_line(f"listening on {scheme}://")
        return line.split("listening on ", 1)[1].split(" ", 1)[0]

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        rest = (self._pending + err).decode(errors="replace")
        return self.proc.returncode, "\n".join(self.lines) + "\n" + rest

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def request(url: str, data: bytes, **options: Any) -> bytes:
    with sockserve.connect(url, timeout=5, **options) as c:
        return c.request(data)


UPPER = "def upper(request, ctx):\n    return request.upper()\n"


# -- item 17: module:function from the current directory (--app-dir) -------------------


def test_script_imports_handler_from_cwd(tmp_path: Path) -> None:
    (tmp_path / "upper.py").write_text(UPPER)
    with Proc(
        [*sockserve_script(), "serve", "upper:upper", "-l", "tcp://127.0.0.1:0"], tmp_path
    ) as p:
        assert request(p.url("tcp"), b"hello") == b"HELLO"


def test_app_dir_option(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "upper.py").write_text(UPPER)
    argv = [*sockserve_script(), "serve", "upper:upper", "-l", "tcp://127.0.0.1:0"]
    with Proc([*argv, "--app-dir", "app"], tmp_path) as p:
        assert request(p.url("tcp"), b"abc") == b"ABC"


def test_config_service_imported_from_cwd(tmp_path: Path) -> None:
    (tmp_path / "upper.py").write_text(UPPER)
    (tmp_path / "s.toml").write_text(
        '[[service]]\nname = "upper:upper"\nlisten = ["tcp://127.0.0.1:0"]\n'
    )
    with Proc([*sockserve_script(), "serve", "--config", "s.toml"], tmp_path) as p:
        assert request(p.url("tcp"), b"xyz") == b"XYZ"


# -- item 24: SERVICE/--listen with --config; framing on a byte-stream service ----------


@pytest.mark.parametrize(
    "extra",
    [["echo"], ["--listen", "tcp://127.0.0.1:0"], ["echo", "--listen", "tcp://127.0.0.1:0"]],
)
def test_config_with_service_or_listen_is_a_usage_error(tmp_path: Path, extra: list[str]) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('[[service]]\nname = "timestamp"\nlisten = ["tcp://127.0.0.1:0"]\n')
    r = run_cli("serve", *extra, "--config", str(cfg), timeout=15)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "cannot be combined with --config" in err, err


def test_framing_on_stream_service_warns(tmp_path: Path) -> None:
    with Proc(
        [*sockserve_script(), "serve", "echo", "-l", "tcp://127.0.0.1:0", "--framing", "line"]
    ) as p:
        line = p.wait_line("ignores framing")
        assert "WARNING" in line and "'line'" in line, line


# -- item 25: handler signature checked at start ------------------------------------------


def test_one_argument_handler_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "upper.py").write_text("def upper(request):\n    return request.upper()\n")
    r = subprocess.run(
        [*sockserve_script(), "serve", "upper:upper", "-l", "tcp://127.0.0.1:0"],
        cwd=tmp_path,
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.decode() == (
        "sockserve serve: handler upper:upper takes 1 argument; "
        "a handler is called as handler(request, ctx)\n"
    )


def three(request: bytes, ctx: object, extra: object) -> bytes:
    return request


def kwonly(request: bytes, ctx: object, *, must: int) -> bytes:
    return request


@pytest.mark.parametrize(("handler", "words"), [(three, "takes 3 arguments"), (kwonly, "must")])
def test_bad_handlers_refused_by_api(handler: Any, words: str) -> None:
    with pytest.raises(ServiceError, match=words):
        make_binding(handler, ["tcp://127.0.0.1:0"])


class Callable2:
    def __call__(self, request: bytes, ctx: object) -> bytes:
        return request[::-1]


class AsyncCallable:
    async def __call__(self, request: bytes, ctx: object) -> bytes:
        return request + b"!"


def with_default(request: bytes, ctx: object, suffix: bytes = b"?") -> bytes:
    return request + suffix


@pytest.mark.parametrize(
    ("handler", "reply"),
    [
        (Callable2(), b"cba"),
        (AsyncCallable(), b"abc!"),
        (functools.partial(with_default, suffix=b"#"), b"abc#"),
        (with_default, b"abc?"),
        (lambda *args: args[0], b"abc"),
        (bytes.__add__, None),  # a builtin method: no readable signature needed
    ],
)
def test_good_handlers_still_start(handler: Any, reply: bytes | None) -> None:
    with ServerThread(Server(make_binding(handler, ["tcp://127.0.0.1:0"]))) as st:
        if reply is not None:
            assert request(st.url("tcp"), b"abc") == reply


def test_builtin_without_signature_is_taken_on_trust() -> None:
    with pytest.raises(ValueError):
        __import__("inspect").signature(max)
    make_binding(max, ["tcp://127.0.0.1:0"])  # no signature to check: not refused


# -- item 28: logging ------------------------------------------------------------------


def test_no_access_log(tmp_path: Path) -> None:
    base = [*sockserve_script(), "serve", "-l", "tcp://127.0.0.1:0"]
    outs = {}
    for flag in ([], ["--no-access-log"]):
        with Proc(base + flag) as p:
            url = p.url("tcp")
            assert request(url, b"hi").endswith(b"hi")
            # A denied-free, warning-free run: the only per-connection lines are open/close.
            rc, out = p.stop()
        assert rc == 0, out
        outs[bool(flag)] = out
    assert "open from" in outs[False] and "close" in outs[False]
    assert "open from" not in outs[True] and ": close " not in outs[True], outs[True]
    assert "listening on" in outs[True]


def test_verbose_is_debug() -> None:
    argv = [*sockserve_script(), "serve", "-l", "udp://127.0.0.1:0", "-v"]
    with Proc([*argv, "--udp-min-source-port", "65535"]) as p:
        host, port = p.url("udp").removeprefix("udp://").rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", (host, int(port)))  # from an ephemeral port < 65535: dropped
            line = p.wait_line("dropped datagram")
    assert " DEBUG " in line, line


def test_quiet_is_warning() -> None:
    argv = [*sockserve_script(), "serve", "echo", "-l", "tcp://127.0.0.1:0", "--framing", "line"]
    with Proc([*argv, "-q"]) as p:
        p.wait_line("ignores framing")  # the one warning: the server is up
        rc, out = p.stop()
    assert rc == 0 and " INFO " not in out and "listening on" not in out, out


API_SCRIPT = textwrap.dedent(
    """
    import sockserve
    def upper(request, ctx):
        return request.upper()
    sockserve.serve(upper, "tcp://127.0.0.1:0")
    """
)


def test_api_serve_logs_listening_lines(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(API_SCRIPT)
    with Proc([sys.executable, str(script)]) as p:
        url = p.url("tcp")
        assert request(url, b"ab") == b"AB"
        rc, out = p.stop()
    assert rc == 0, out


def test_api_serve_keeps_users_logging(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, format='USER %(name)s %(message)s', level=logging.INFO)\n"
        + API_SCRIPT
    )
    with Proc([sys.executable, str(script)]) as p:
        line = p.wait_line("listening on")
        assert line.startswith("USER sockserve.server listening on"), line
        p.stop()


# -- item 29: help epilogs, services wording, completion ---------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["services", "--help"]])
def test_help_ends_with_examples_and_exit_codes(argv: list[str]) -> None:
    r = run_cli(*argv)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    tail = out[out.index("examples:") :]
    assert "exit codes:" in tail and "sockserve" in tail, out


def test_services_header_says_usual_port() -> None:
    r = run_cli("services")
    first = r.stdout.decode().splitlines()[0]
    assert "usual port" in first.lower(), first
    assert "default" not in first.lower()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    r = run_cli("completion", shell)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    for word in ("serve", "call", "bench", "listen", "framing", "no-access-log", "app-dir"):
        assert word in out, (shell, word)


def test_completion_script_works_in_bash(tmp_path: Path) -> None:
    """Source the generated script in a real bash and ask it to complete ``sockserve se``."""
    r = run_cli("completion", "bash")
    script = tmp_path / "c.bash"
    script.write_text(r.stdout.decode())
    probe = (
        f"source {script}; COMP_WORDS=(sockserve serve --no-acc); COMP_CWORD=2; "
        "COMP_LINE='sockserve serve --no-acc'; COMP_POINT=${#COMP_LINE}; "
        "_shtab_sockserve; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    out = subprocess.run(
        ["bash", "-c", probe], capture_output=True, timeout=15, check=False
    ).stdout.decode()
    assert "--no-access-log" in out, out


def test_completion_bad_shell_is_usage_error() -> None:
    r = run_cli("completion", "tcsh-nope")
    assert r.returncode == 2 and r.stderr.decode().count("\n") <= 3


def test_call_does_not_import_completion_or_shtab() -> None:
    code = (
        "import sys, sockserve.cli.main as m\n"
        "m.main(['call', 'tcp://127.0.0.1:1', 'x', '--timeout', '0.1'])\n"
        "print('shtab' in sys.modules, 'sockserve.cli.completion' in sys.modules,"
        " 'argparse' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=15, check=False)
    assert r.stdout.decode().split() == ["False", "False", "False"], r.stdout + r.stderr


# -- item 30: --trace --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["auto", "asyncio"])
def test_trace_hex_dump_every_transport(sock_dir: Path, engine: str) -> None:
    urls = ["tcp://127.0.0.1:0", "udp://127.0.0.1:0", f"unix://{sock_dir}/t.sock"]
    argv = [*sockserve_script(), "serve", "-l", urls[0], "-l", urls[1], "-l", urls[2]]
    with Proc([*argv, "--trace", "--engine", engine]) as p:
        got = {s: p.url(s) for s in ("tcp", "udp", "unix")}
        for scheme, url in got.items():
            reply = request(url, b"\x00\xffhi " + scheme[:3].encode())
            assert reply.endswith(b"hi " + scheme[:3].encode())
        rc, out = p.stop()
    assert rc == 0
    for scheme in got:
        # hexdump -C style: offset, hex bytes, printable text between bars.
        tag = scheme[:3]
        assert f"00000000  00 ff 68 69 20 {' '.join(f'{b:02x}' for b in tag.encode())}" in out
        assert f"|..hi {tag}|" in out
    assert out.count("request from") >= 3 and out.count("reply to") >= 3


def test_trace_async_handler_stays_async_and_stream_service(sock_dir: Path) -> None:
    from sockserve.service import Service, is_async_handler, traced

    async def ah(request: bytes, ctx: object) -> bytes:
        return request

    def sh(request: bytes, ctx: object) -> bytes:
        return request

    t = traced(Service("x", handler=ah, datagram=sh))
    assert is_async_handler(t.handler) and not is_async_handler(t.datagram)
    with Proc([*sockserve_script(), "serve", "echo", "-l", "tcp://127.0.0.1:0", "--trace"]) as p:
        url = p.url("tcp")
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(10) == b"ping"
        _, out = p.stop()
    assert "received from" in out and "sent to" in out and "|ping|" in out


# -- item 31: ServerConfig converts every network field ------------------------------------


def test_proxy_from_strings_are_converted_and_work() -> None:
    cfg = ServerConfig(proxy_protocol=True, proxy_from=("127.0.0.0/8",), allow="127.0.0.0/8")
    assert all(hasattr(n, "network_address") for n in (*cfg.proxy_from, *cfg.allow))
    with ServerThread(Server(make_binding("timestamp", ["tcp://127.0.0.1:0"], cfg))) as st:
        host, port = st.url("tcp").removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 21567\r\nhello")
            assert s.recv(100).endswith(b"] hello")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"proxy_from": ("nope",)}, "proxy_from"),
        ({"deny": (5,)}, "deny"),
        ({"allow": 3}, "allow"),
        ({"unix_mode": "99x"}, "unix_mode"),
        ({"max_message": "lots"}, "max_message"),
        ({"max_conns": "5"}, "max_conns"),
        ({"idle_timeout": True}, "idle_timeout"),
        ({"tls_cert": 7}, "tls_cert"),
    ],
)
def test_bad_values_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"ServerConfig {field}:"):
        ServerConfig(**options)


def test_str_forms_converted() -> None:
    cfg = ServerConfig(unix_mode="660", max_message="1K", tls_cert=Path("/c"), tls_key="k")
    assert (cfg.unix_mode, cfg.max_message, cfg.tls_cert) == (0o660, 1024, "/c")
    assert isinstance(ConfigError("x"), ValueError)


# -- item 32: dual-stack endpoints ----------------------------------------------------------


def _v6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_bracket_any_is_ipv6_only() -> None:
    assert _v6_loopback(), "this suite needs IPv6 loopback (::1)"
    with ServerThread(Server(make_binding("timestamp", ["tcp://[::]:0"]))) as st:
        port = st.server.endpoints[0].port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def peer_host(request: bytes, ctx: Any) -> bytes:
    return str(ctx.peer[0]).encode()


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_dualstack_serves_ipv4_and_ipv6(scheme: str) -> None:
    assert _v6_loopback(), "this suite needs IPv6 loopback (::1)"
    url = f"{scheme}://*:0"
    assert sockserve.parse_endpoint(url).is_dualstack
    with ServerThread(Server(make_binding(peer_host, [url]))) as st:
        ep = st.server.endpoints[0]
        assert ep.url() == f"{scheme}://*:{ep.port}"
        assert request(f"{scheme}://127.0.0.1:{ep.port}", b"x").endswith(b"127.0.0.1")
        assert request(f"{scheme}://[::1]:{ep.port}", b"x") == b"::1"


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_dualstack_ipv4_clients_match_ipv4_rules(scheme: str) -> None:
    """An IPv4 client arrives as ::ffff:127.0.0.1; IPv4 allow/deny rules must apply to it."""
    cfg = ServerConfig(allow=("127.0.0.1/32",), deny=("127.0.0.2/32",))
    with ServerThread(Server(make_binding("timestamp", [f"{scheme}://*:0"], cfg))) as st:
        port = st.server.endpoints[0].port
        assert request(f"{scheme}://127.0.0.1:{port}", b"in").endswith(b"in")
        refused = [
            (f"{scheme}://127.0.0.1:{port}", "127.0.0.2"),
            (f"{scheme}://[::1]:{port}", "::1"),
        ]
        for url, source in refused:
            with (
                pytest.raises((sockserve.ConnectionClosed, sockserve.RequestTimeout)),
                sockserve.connect(url, timeout=1, source=(source, 0)) as c,
            ):
                c.request(b"out")


def test_dualstack_from_cli() -> None:
    with Proc([*sockserve_script(), "serve", "-l", "tcp://*:0", "--no-access-log"]) as p:
        url = p.url("tcp")
        port = url.rsplit(":", 1)[1]
        assert request(f"tcp://127.0.0.1:{port}", b"a").endswith(b"a")
        assert request(f"tcp://[::1]:{port}", b"b").endswith(b"b")


def test_dualstack_with_workers() -> None:
    """The supervisor reserves a dual-stack port 0 and every worker serves both families."""
    argv = [*sockserve_script(), "serve", "-l", "tcp://*:0", "--workers", "2", "--no-access-log"]
    with Proc(argv) as p:
        port = p.url("tcp").rsplit(":", 1)[1]
        assert request(f"tcp://127.0.0.1:{port}", b"a").endswith(b"a")
        assert request(f"tcp://[::1]:{port}", b"b").endswith(b"b")
        rc, out = p.stop()
    assert rc == 0, out


def test_trace_key_in_config_file(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[[service]]\nname = "timestamp"\nlisten = ["tcp://127.0.0.1:0"]\ntrace = true\n'
    )
    with Proc([*sockserve_script(), "serve", "--config", "s.toml"], tmp_path) as p:
        request(p.url("tcp"), b"zz")
        line = p.wait_line("request from")
        assert "(2 bytes)" in line
