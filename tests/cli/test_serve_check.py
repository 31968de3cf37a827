"""``sockserve serve --check``: validates options and ``--config`` as serving would, binds nothing."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from support import free_port, run_cli

OK = "sockserve serve: {}: OK ({}; nothing bound)\n"


def check(*args: str) -> tuple[int, str, str]:
    proc = run_cli("serve", "--check", *args)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_a_good_file_checks_ok_and_nothing_listens(tmp_path: Path) -> None:
    port = free_port()
    sock = tmp_path / "u.sock"
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        f'[[service]]\nname = "echo"\nlisten = ["tcp://127.0.0.1:{port}", "unix://{sock}"]\n'
        f'[[service]]\nname = "timestamp"\nlisten = ["udp://127.0.0.1:{port}"]\nmax_conns = 3\n'
    )
    rc, out, err = check("--config", str(cfg))
    assert (rc, out, err) == (0, OK.format(cfg, "2 services, 3 endpoints"), "")
    assert refused(port) and not sock.exists()


def test_a_port_in_use_still_checks_ok(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, err = check("-l", f"tcp://127.0.0.1:{port}", "--framing", "line")
        assert (rc, out, err) == (0, OK.format("command line", "1 service, 1 endpoint"), "")
        # Serving the same would fail: the check really skipped the bind.
        served = run_cli("serve", "-l", f"tcp://127.0.0.1:{port}")
        assert served.returncode == 1 and b"address already in use" in served.stderr


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('framng = "line"', "#1 (echo): unknown key 'framng'"),
        ('idle_timeout = "60"', "#1 (echo): key 'idle_timeout': expected a number"),
        ("backlog = 0", "#1 (echo): backlog must be at least 1, got 0 (key 'backlog')"),
        ("busy_poll_us = 20000", "(key 'busy_poll_us')"),
        ('engine = "threads"', "unknown engine 'threads'; expected auto or asyncio (key 'engine')"),
        (
            'listen = ["tcp://127.0.0.1"]',
            "#1 (echo): key 'listen': 'tcp://127.0.0.1': missing port",
        ),
        ('name = "nosuchmodule:f"', "#1 (nosuchmodule:f): cannot import module 'nosuchmodule'"),
        ('tls_cert = "missing.pem"', "cannot load TLS certificate 'missing.pem'"),
        ("options = { a = 1 }", "#1 (echo): service echo takes no options (got a)"),
    ],
)
def test_a_bad_file_exits_2_with_one_line_naming_file_table_and_key(
    tmp_path: Path, table: str, message: str
) -> None:
    cfg = tmp_path / "s.toml"
    listen = "" if table.startswith("listen") else 'listen = ["tls://127.0.0.1:0"]\n'
    body = f'[[service]]\nname = "echo"\n{listen}{table}\n'
    if table.startswith("name"):
        body = f'[[service]]\n{table}\nlisten = ["tcp://127.0.0.1:0"]\n'
    cfg.write_text(body)
    rc, out, err = check("--config", str(cfg))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"sockserve serve: {cfg}: [[service]] #1 ") and message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-message", "lots"], "--max-message: bad size: "),
        (["--busy-poll", "99999"], "got 99999 (option --busy-poll-us)"),
        (["--write-high-water", "1K"], "(option --write-high-water)"),
        (["--allow", "10.0.0.300/8"], "--allow: bad network '10.0.0.300/8'"),
        (["--unix-mode", "9"], "--unix-mode: bad Unix socket mode '9'"),
        (["-l", "ftp://x:1"], "ftp://x:1"),
        (["nosuchmodule:f"], "cannot import module 'nosuchmodule'"),
        (["-l", "tls://127.0.0.1:0", "--tls-cert", "missing.pem"], "'missing.pem'"),
        (["--metrics", "nohost"], "nohost"),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_them(args: list[str], message: str) -> None:
    rc, out, err = check(*args)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sockserve serve: ") and message in err, err


def test_check_loads_the_tls_files(tmp_path: Path, certs: Any) -> None:
    good = ["-l", "tls://127.0.0.1:0", "--tls-cert", certs.server_cert]
    assert check(*good, "--tls-key", certs.server_key)[0] == 0
    bad_key = tmp_path / "k.pem"
    bad_key.write_text("not a key\n")
    rc, _, err = check(*good, "--tls-key", str(bad_key))
    assert rc == 2 and str(bad_key) in err and err.count("\n") == 1, err
    rc, _, err = check("-l", "tls://127.0.0.1:0")
    assert rc == 2 and "tls:// endpoints need --tls-cert" in err, err
