"""``--metrics``: Prometheus text scraped over HTTP, single process and summed across workers."""

from __future__ import annotations

import os
import signal
import socket

from deploy_helpers import addr_of, request, sample, scrape, serve_proc, udp_request, wait_for

from sockserve.deploy.metrics import BUCKETS, MetricsState, Stats, merge, meter
from sockserve.service import Service


def test_scrape_single_process() -> None:
    with serve_proc(
        "deploy_helpers:boom",
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "udp://127.0.0.1:0",
        "--framing",
        "line",
        "--max-message",
        "16",
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        tcp, udp = (addr_of(u) for u in p.endpoints(2))
        url = p.wait_log(r"metrics on (\S+)")[0].group(1)
        for i in range(7):
            assert request(tcp, b"hello %d\n" % i) == b"hello %d\n" % i
        for _ in range(3):
            assert udp_request(udp, b"ping") == b"ping"
        held = socket.create_connection(tcp, timeout=5)
        held.sendall(b"held\n")
        assert held.recv(100) == b"held\n"
        assert request(tcp, b"boom\n") == b""  # the handler raised: connection closed
        assert request(tcp, b"x" * 40 + b"\n") == b""  # over --max-message: protocol error

        tcp_l = {"service": "deploy_helpers:boom", "transport": "tcp"}
        udp_l = {"service": "deploy_helpers:boom", "transport": "udp"}
        wait_for(
            lambda: sample(scrape(url), "sockserve_errors_total", **tcp_l, kind="protocol") == 1,
            10,
            "protocol error counted",
        )
        m = scrape(url)
        assert sample(m, "sockserve_requests_total", **tcp_l) == 8
        assert sample(m, "sockserve_requests_total", **udp_l) == 3
        assert sample(m, "sockserve_connections", **tcp_l) == 1
        assert sample(m, "sockserve_received_bytes_total", **udp_l) == 12
        assert sample(m, "sockserve_sent_bytes_total", **udp_l) == 12
        assert sample(m, "sockserve_received_bytes_total", **tcp_l) == 7 * 7 + 4
        assert sample(m, "sockserve_errors_total", **tcp_l, kind="handler") == 1
        assert sample(m, "sockserve_request_duration_seconds_count", **tcp_l) == 8
        assert sample(m, "sockserve_request_duration_seconds_bucket", **tcp_l, le="+Inf") == 8
        assert 0 < sample(m, "sockserve_request_duration_seconds_sum", **tcp_l) < 5
        held.close()
        wait_for(
            lambda: sample(scrape(url), "sockserve_connections", **tcp_l) == 0, 10, "gauge to drop"
        )
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_one_scrape_counts_every_worker() -> None:
    with serve_proc(
        "deploy_helpers:pid",
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        tcp = addr_of(p.endpoints(2)[0])
        url = p.wait_log(r"metrics on (\S+)")[0].group(1)
        pids = [request(tcp, b"?") for _ in range(60)]
        assert len(set(pids)) == 2  # both workers answered some
        labels = {"service": "deploy_helpers:pid", "transport": "tcp"}
        assert sample(scrape(url), "sockserve_requests_total", **labels) == 60
        # A worker that dies takes no counts with it (its last answer is kept).
        os.kill(int(pids[0]), signal.SIGKILL)
        p.wait_log(r"was killed by SIGKILL; restarting")
        assert sample(scrape(url), "sockserve_requests_total", **labels) == 60
        p.endpoints(3)
        for _ in range(5):
            request(tcp, b"?")
        assert sample(scrape(url), "sockserve_requests_total", **labels) == 65
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_meter_counts_without_prometheus_in_the_path() -> None:
    """The metered handler is plain Python: counts, bytes and the right bucket."""
    st = Stats()
    svc = meter(Service("t", handler=lambda req, ctx: req * 2), st)
    assert svc.handler is not None
    for _ in range(4):
        assert svc.handler(b"ab", None) == b"abab"  # type: ignore[arg-type]
    assert (st.requests, st.bytes_in, st.bytes_out) == (4, 8, 16)
    assert sum(st.buckets) == 4 and st.buckets[-1] == 0
    assert len(st.buckets) == len(BUCKETS) + 1
    state = MetricsState()
    state.stats[("t", "tcp")] = st
    merged = merge([{**_series(st), "service": "t", "transport": "tcp"}] * 2)
    assert merged[0]["requests"] == 8


def _series(st: Stats) -> dict[str, object]:
    return {
        "requests": st.requests,
        "bytes_in": st.bytes_in,
        "bytes_out": st.bytes_out,
        "duration": st.duration,
        "buckets": st.buckets,
        "errors": {},
        "connections": 0,
    }


def test_metrics_port_in_use_is_reported() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with serve_proc("--listen", "tcp://127.0.0.1:0", "--metrics", f"127.0.0.1:{port}") as p:
            assert p.wait() == 1
            assert f"metrics http://127.0.0.1:{port}/metrics: cannot bind" in p.log
    finally:
        taken.close()
