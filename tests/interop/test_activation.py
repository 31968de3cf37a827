"""systemd socket activation, driven by the real ``systemd-socket-activate`` (package systemd).

The tool listens, waits for the first client, then execs ``sockserve serve`` with
LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES: the queued client is served by the
inherited socket, whose kind (stream or datagram, inet or Unix) is read from it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
from deploy_helpers import TESTS, Proc, request
from strict import needs
from support import free_port

from sockserve.deploy.activation import listen_fds
from sockserve.errors import ConfigError

ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
needs_tool = needs(
    os.path.exists(ACTIVATE), "systemd-socket-activate not installed (Debian package systemd)"
)


def activate(*tool_args: str, serve_args: tuple[str, ...] = ()) -> Proc:
    p = Proc(
        [
            ACTIVATE,
            *tool_args,
            "-E",
            f"PYTHONPATH={TESTS}",
            sys.executable,
            "-m",
            "sockserve",
            "serve",
            *serve_args,
        ]
    )
    p.wait_log(r"Listening on", count=tool_args.count("-l"))
    return p


@needs_tool
def test_stream_sockets_tcp_and_unix(tmp_path: Path) -> None:
    port, path = free_port(), str(tmp_path / "s.sock")
    with activate(
        "-l", f"127.0.0.1:{port}", "-l", path, serve_args=("deploy_helpers:whoami",)
    ) as p:
        # The first client wakes the service; its connection waits in the inherited backlog.
        reply = request(("127.0.0.1", port), b"hi", timeout=15)
        assert reply.startswith(b"127.0.0.1 ") and reply.endswith(b" hi")
        eps = p.endpoints(2)
        assert eps == [f"tcp://127.0.0.1:{port}", f"unix://{path}"]
        assert request(path, b"unix").endswith(b" unix")
        assert "21567" not in p.log  # the default endpoints are not bound
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
        assert Path(path).exists()  # systemd's file: not ours to remove


@needs_tool
def test_datagram_sockets_udp_and_unixgram(tmp_path: Path) -> None:
    port, path = free_port(), str(tmp_path / "d.sock")
    with activate(
        "-d", "-l", f"127.0.0.1:{port}", "-l", path, serve_args=("deploy_helpers:upper",)
    ) as p:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(15)
            u.sendto(b"wake", ("127.0.0.1", port))
            assert u.recv(100) == b"WAKE"
        assert p.endpoints(2) == [f"udp://127.0.0.1:{port}", f"unixgram://{path}"]
        client = str(tmp_path / "c.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as g:
            g.settimeout(5)
            g.bind(client)
            g.sendto(b"gram", path)
            assert g.recv(100) == b"GRAM"
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


@needs_tool
def test_fdnames_map_sockets_to_config_services(tmp_path: Path) -> None:
    up, low = str(tmp_path / "up.sock"), str(tmp_path / "low.sock")
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        """
[[service]]
name = "deploy_helpers:upper"
socket = "up"

[[service]]
name = "deploy_helpers:lower"
socket = "low"

[[service]]
name = "deploy_helpers:whoami"
listen = ["tcp://127.0.0.1:0"]
"""
    )
    with activate("-l", up, "-l", low, "--fdname=up:low", serve_args=("--config", str(cfg))) as p:
        assert request(up, b"Mixed", timeout=15) == b"MIXED"
        assert request(low, b"Mixed") == b"mixed"
        eps = p.endpoints(3)
        assert eps[:2] == [f"unix://{up}", f"unix://{low}"]
        assert eps[2].startswith("tcp://127.0.0.1:")  # no socket named for it: binds its own
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


@needs_tool
def test_activated_sockets_shared_by_workers(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sock")
    with activate("-l", path, serve_args=("deploy_helpers:pid", "--workers", "2")) as p:
        assert request(path, b"?", timeout=15).isdigit()
        p.endpoints(2)  # both workers serve the one inherited socket
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


@needs_tool
def test_unmatched_fdname_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('[[service]]\nname = "deploy_helpers:upper"\nsocket = "up"\n')
    path = str(tmp_path / "x.sock")
    with activate("-l", path, "--fdname=other", serve_args=("--config", str(cfg))) as p:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)  # wakes it
            assert p.wait() == 2
        assert "name 'other') matches no [[service]]; set socket = 'other' on one" in p.log


def test_not_for_us_when_listen_pid_differs() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_fds(env) == []
    assert env == {}  # unset either way, so children do not inherit them


def test_malformed_variables_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bad LISTEN_PID"):
        listen_fds({"LISTEN_PID": "me", "LISTEN_FDS": "1"})
    with pytest.raises(ConfigError, match="2 names for 1 fds"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"})


def test_not_activated() -> None:
    assert listen_fds({}) == []
