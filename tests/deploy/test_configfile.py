"""``--config services.toml``: parsing with clear errors, several services, SIGHUP reload."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from deploy_helpers import addr_of, request, serve_proc, udp_request, wait_for

from sockserve.config import ServerConfig
from sockserve.deploy.configfile import load_config_file
from sockserve.errors import ConfigError


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_parses_services_with_options(tmp_path: Path) -> None:
    f = write(
        tmp_path / "s.toml",
        """
[[service]]
name = "timestamp"
listen = ["tcp://127.0.0.1:0", "udp://127.0.0.1:0"]

[[service]]
name = "deploy_helpers:upper"
listen = "unix:///tmp/x.sock"
framing = "line"
max_message = "1K"
idle_timeout = 0
allow = ["10.0.0.0/8"]
proxy_protocol = true
socket = "up"
""",
    )
    base = ServerConfig(drain_timeout=3.0)
    a, b = load_config_file(f, base)
    assert a.spec == "timestamp" and [e.url() for e in a.endpoints] == [
        "tcp://127.0.0.1:0",
        "udp://127.0.0.1:0",
    ]
    assert a.config.framing == "raw" and a.config.drain_timeout == 3.0
    assert b.config.framing == "line" and b.config.max_message == 1024
    assert b.config.idle_timeout is None and b.config.proxy_protocol
    assert str(b.config.allow[0]) == "10.0.0.0/8" and b.socket == "up"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[service]]\nlisten = []\n", r"#1: key 'name' is required"),
        (
            '[[service]]\nname = "timestamp"\nframng = "line"\n',
            r"#1 \(timestamp\): unknown key 'framng'",
        ),
        (
            '[[service]]\nname = "timestamp"\nframing = "lines"\n',
            r"#1 \(timestamp\): unknown framing 'lines'",
        ),
        (
            '[[service]]\nname = "timestamp"\nmax_message = "lots"\n',
            r"key 'max_message': expected bytes",
        ),
        (
            '[[service]]\nname = "timestamp"\nidle_timeout = "60"\n',
            r"key 'idle_timeout': expected a number",
        ),
        (
            '[[service]]\nname = "timestamp"\nallow = ["10.0.0.300/8"]\n',
            r"key 'allow': bad network",
        ),
        (
            '[[service]]\nname = "timestamp"\nlisten = ["tcp://h"]\n',
            r"key 'listen': 'tcp://h': missing port",
        ),
        (
            '[[service]]\nname = "timestamp"\nudp_amplify = 1\n',
            r"key 'udp_amplify': expected true or false",
        ),
        ("services = 1\n", r"unknown top-level key 'services'"),
        ("", r"no \[\[service\]\] tables"),
        ("[[service]\n", r"not valid TOML"),
        (
            '[[service]]\nname = "timestamp"\nlisten = ["tcp://127.0.0.1:7"]\n'
            '[[service]]\nname = "timestamp"\nlisten = ["tcp://127.0.0.1:7"]\n',
            r"#2 \(timestamp\): tcp://127.0.0.1:7 is already served by .*#1",
        ),
    ],
)
def test_errors_name_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(f)
    assert str(info.value).startswith(f"{f}: ")


def test_missing_file_is_a_usage_error_on_the_cli(tmp_path: Path) -> None:
    with serve_proc("--config", str(tmp_path / "nope.toml")) as p:
        assert p.wait() == 2
        assert "nope.toml: cannot read config file" in p.log


def test_several_services_in_one_process(tmp_path: Path) -> None:
    sock = tmp_path / "lo.sock"
    f = write(
        tmp_path / "s.toml",
        f"""
[[service]]
name = "deploy_helpers:upper"
listen = ["tcp://127.0.0.1:0", "udp://127.0.0.1:0"]

[[service]]
name = "deploy_helpers:lower"
listen = ["unix://{sock}"]
framing = "line"
""",
    )
    with serve_proc("--config", f) as p:
        eps = p.endpoints(3)
        assert request(addr_of(eps[0]), b"abc") == b"ABC"
        assert udp_request(addr_of(eps[1]), b"abc") == b"ABC"
        assert request(str(sock), b"XYZ\n") == b"xyz\n"
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_sighup_reload_keeps_unchanged_sockets_and_open_connections(tmp_path: Path) -> None:
    gone = tmp_path / "gone.sock"
    cfg = tmp_path / "s.toml"
    write(
        cfg,
        f"""
[[service]]
name = "deploy_helpers:upper"
listen = ["tcp://127.0.0.1:0"]

[[service]]
name = "deploy_helpers:lower"
listen = ["unix://{gone}"]
""",
    )
    with serve_proc("--config", str(cfg)) as p:
        up = addr_of(p.endpoints(2)[0])
        held = socket.create_connection(up, timeout=5)  # held open across every reload
        held.sendall(b"before")
        assert held.recv(100) == b"BEFORE"

        # 1. lower removed, whoami added, upper unchanged.
        write(
            cfg,
            """
[[service]]
name = "deploy_helpers:upper"
listen = ["tcp://127.0.0.1:0"]

[[service]]
name = "deploy_helpers:whoami"
listen = ["tcp://127.0.0.2:0"]
""",
        )
        p.signal(signal.SIGHUP)
        p.wait_log(r"reloaded .*: 1 added, 1 removed, 0 changed, 1 unchanged")
        held.sendall(b"after")
        assert held.recv(100) == b"AFTER"  # same connection, same process
        assert request(up, b"new") == b"NEW"  # same listening socket, same port
        who = addr_of(p.endpoints(3)[2])
        assert who[0] == "127.0.0.2" and request(who, b"x").startswith(b"127.0.0.1 ")
        wait_for(lambda: not gone.exists(), 5, "removed service's socket file to go")

        # 2. upper's options change: its socket is handed over to the new options at once;
        #    the open connection keeps the settings it was accepted with (no request lost).
        write(
            cfg,
            """
[[service]]
name = "deploy_helpers:upper"
listen = ["tcp://127.0.0.1:0"]
framing = "line"

[[service]]
name = "deploy_helpers:whoami"
listen = ["tcp://127.0.0.2:0"]
""",
        )
        p.signal(signal.SIGHUP)
        p.wait_log(r"reloaded .*: 0 added, 0 removed, 1 changed, 1 unchanged")
        assert addr_of(p.endpoints(4)[3]) == up  # re-listed on the very same port
        held.sendall(b"kept")
        assert held.recv(100) == b"KEPT"  # still served, still raw framing
        held.close()
        assert request(up, b"new conn\n") == b"NEW CONN\n"  # new connections: line framing
        held = socket.create_connection(up, timeout=5)
        held.sendall(b"held\n")
        assert held.recv(100) == b"HELD\n"

        # 3. a broken file changes nothing.
        write(cfg, "[[service]]\nname = 'no_such_module:x'\nlisten = ['tcp://127.0.0.1:0']\n")
        p.signal(signal.SIGHUP)
        p.wait_log(r"reload failed, still serving the previous configuration: .*no_such_module")
        held.sendall(b"still\n")
        assert held.recv(100) == b"STILL\n"
        assert request(who, b"x").startswith(b"127.0.0.1 ")

        held.close()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_sighup_without_config_is_ignored() -> None:
    with serve_proc("deploy_helpers:upper", "--listen", "tcp://127.0.0.1:0") as p:
        addr = addr_of(p.endpoints(1)[0])
        p.signal(signal.SIGHUP)
        p.wait_log("no --config file to reload")
        assert request(addr, b"x") == b"X"
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_example_services_toml_parses() -> None:
    """deploy/systemd/services.toml, as shipped, is a valid config."""
    f = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "services.toml"
    entries = load_config_file(str(f))
    assert [e.spec for e in entries] == ["timestamp", "echo"]
    assert entries[0].socket == "timestamp" and entries[1].config.framing == "line"
