"""Behind a real HAProxy: PROXY v1/v2 from send-proxy(-v2), and fail-over between instances.

HAProxy (Debian package ``haproxy``) runs in the foreground with listening
sockets the test bound and passed as ``bind fd@N``, so no port is guessed.
Clients bind 127.0.0.3 so the real client differs from the proxy's address.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy_helpers import (
    HAProxy,
    addr_of,
    haproxy_path,
    listening_socket,
    serve_proc,
    wait_for,
    whoami,
)
from strict import needs

from sockserve.server import ServerThread

pytestmark = needs(haproxy_path(), "haproxy not installed (Debian package haproxy)")

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


def test_failover_stop_one_instance_under_load(tmp_path: Path) -> None:
    """Two instances behind HAProxy with health checks; one is stopped while clients keep going.

    Once HAProxy's check marks it DOWN, every request must succeed, on the other one.
    """
    opts = ("--listen", "tcp://127.0.0.1:0", "--proxy-protocol", "--proxy-from", "127.0.0.1/32")
    a = serve_proc("deploy_helpers:pid", *opts)
    b = serve_proc("deploy_helpers:pid", *opts)
    fe = listening_socket()
    fe_addr = fe.getsockname()
    try:
        pa, pb = addr_of(a.endpoints(1)[0])[1], addr_of(b.endpoints(1)[0])[1]
        cfg = (
            global_section(tmp_path)
            + DEFAULTS
            + f"""
    retries 3
    option redispatch
frontend fe
    bind fd@{fe.fileno()}
    default_backend be
backend be
    balance roundrobin
    default-server check inter 100ms fall 2 rise 2 send-proxy-v2 check-send-proxy
    server a 127.0.0.1:{pa}
    server b 127.0.0.1:{pb}
"""
        )
        with HAProxy(tmp_path, cfg, [fe.fileno()]) as hap:
            fe.close()
            wait_for(lambda: hap.server_status("be", "a") == "UP", 10, "a UP")
            wait_for(lambda: hap.server_status("be", "b") == "UP", 10, "b UP")
            results: list[tuple[float, bytes | None]] = []
            stop = threading.Event()

            def client() -> None:
                deadline = time.monotonic() + 30  # bounded whatever happens
                while not stop.is_set() and time.monotonic() < deadline and len(results) < 20000:
                    t = time.monotonic()
                    try:
                        reply: bytes | None = ask(fe_addr, b"?")
                    except OSError:
                        reply = None
                    results.append((t, reply if reply else None))

            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                wait_for(lambda: len({r for _, r in results if r}) == 2, 10, "both instances used")
                a_pid = str(a.proc.pid).encode()
                a.signal(signal.SIGTERM)  # stops listening at once, drains, exits
                wait_for(lambda: hap.server_status("be", "a").startswith("DOWN"), 10, "check DOWN")
                t_down = time.monotonic()
                wait_for(
                    lambda: sum(1 for t, _ in results if t > t_down) >= 300, 20, "load after DOWN"
                )
            finally:
                stop.set()
                for t in threads:
                    t.join(35)
            assert a.wait() == 0
            after = [r for t, r in results if t > t_down]
            before = [r for t, r in results if t <= t_down]
            assert len(after) >= 300
            assert all(r is not None for r in after), f"{after.count(None)} failed after DOWN"
            assert set(after) == {str(b.proc.pid).encode()}  # all on the survivor
            assert a_pid in before
            assert "open from 127.0.0.3:" in b.log  # PROXY v2: the real client in the logs
            assert "PROXY header:" not in a.log + b.log  # health checks carry a header too
    finally:
        fe.close()
        a.stop()
        b.stop()


def test_example_config_is_valid() -> None:
    """deploy/haproxy/haproxy.cfg, as shipped, passes ``haproxy -c``."""
    import subprocess

    cfg = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
    exe = haproxy_path()
    assert exe is not None
    done = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, timeout=20)
    assert done.returncode == 0, done.stdout + done.stderr
