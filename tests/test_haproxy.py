"""Behind a real HAProxy: PROXY v1/v2 from send-proxy(-v2), and fail-over between instances.

HAProxy (Debian package ``haproxy``) runs in the foreground with listening
sockets the test bound and passed as ``bind fd@N``, so no port is guessed.
Clients bind 127.0.0.3 so the real client differs from the proxy's address.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    HAProxy,
    haproxy_path,
    listening_socket,
    whoami,
)

from sockserve.server import ServerThread

pytestmark = pytest.mark.skipif(
    haproxy_path() is None, reason="haproxy not installed (Debian package haproxy)"
)

DEFAULTS = """
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
"""


def global_section(workdir: Path) -> str:
    return f"""
global
    maxconn 512
    stats socket {workdir}/admin.sock level admin
"""


def ask(addr: tuple[str, int], data: bytes, source: str = "127.0.0.3") -> bytes:
    with socket.create_connection(addr, timeout=5, source_address=(source, 0)) as s:
        s.sendall(data)
        return s.recv(4096)


def test_send_proxy_v1_and_v2_show_the_real_client(
    serve: Callable[..., ServerThread], tmp_path: Path, server_logs: Any
) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True)
    port = srv.endpoints[0].port
    fe1, fe2 = listening_socket(), listening_socket()
    cfg = (
        global_section(tmp_path)
        + DEFAULTS
        + f"""
frontend fe_v1
    bind fd@{fe1.fileno()}
    default_backend be_v1
frontend fe_v2
    bind fd@{fe2.fileno()}
    default_backend be_v2
backend be_v1
    server s1 127.0.0.1:{port} send-proxy
backend be_v2
    server s1 127.0.0.1:{port} send-proxy-v2
"""
    )
    addrs = [fe1.getsockname(), fe2.getsockname()]
    with HAProxy(tmp_path, cfg, [fe1.fileno(), fe2.fileno()]):
        fe1.close()
        fe2.close()
        for fe_addr, tag in ((addrs[0], b"v1"), (addrs[1], b"v2")):
            with socket.create_connection(fe_addr, timeout=5, source_address=("127.0.0.3", 0)) as s:
                s.sendall(tag)
                reply = s.recv(4096).split()
                client_port = s.getsockname()[1]
            # the real client (127.0.0.3 and its port), and the address it connected to
            assert reply[0] == b"127.0.0.3", reply
            assert int(reply[1]) == client_port
            assert (reply[2].decode(), int(reply[3])) == fe_addr
            assert reply[-1] == tag
            server_logs.wait_for(f"open from 127.0.0.3:{client_port}")
