"""``sockserve bench``: histogram arithmetic on known data, reports, and short real runs.

Runs are bounded by ``-n`` and checked on counts and consistency, never on
speed: timing belongs to ``benchmarks/``, not to the test suite.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from strict import require
from support import free_port

from sockserve.bench import Histogram, LoadResult, LoadSpec, render, summary
from sockserve.bench.histogram import HALF, NBUCKETS, SUB_BITS, bucket_bounds, bucket_index
from sockserve.bench.procs import split
from sockserve.bench.report import draw_histogram, fmt_latency
from sockserve.cli.main import main
from sockserve.endpoints import parse_endpoint
from sockserve.server import Server, ServerConfig, ServerThread, make_binding

# -- histogram -------------------------------------------------------------------------


def test_buckets_tile_the_range_without_gaps() -> None:
    prev = -1
    for i in range(NBUCKETS):
        low, high = bucket_bounds(i)
        assert low == prev + 1
        assert bucket_index(low) == i and bucket_index(high) == i
        prev = high


def test_small_values_are_exact() -> None:
    for v in range(1 << SUB_BITS):
        assert bucket_bounds(bucket_index(v)) == (v, v)


def test_bucket_width_bounds_relative_error() -> None:
    for v in (300, 1_000, 123_456, 10**6, 987_654_321):
        low, high = bucket_bounds(bucket_index(v))
        assert low <= v <= high
        assert (high - low + 1) / low <= 1 / HALF


def test_percentiles_of_1_to_100_are_exact() -> None:
    h = Histogram()
    h.record_many(range(1, 101))
    assert h.count == 100 and h.min == 1 and h.max == 100
    assert h.percentile(50) == 50
    assert h.percentile(90) == 90
    assert h.percentile(99) == 99
    assert h.percentile(100) == 100
    assert h.percentile(0) == 1
    assert h.mean == 50.5


def test_percentiles_of_large_values_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.randrange(1_000, 50_000_000) for _ in range(20_000)]
    h = Histogram()
    h.record_many(values)
    ordered = sorted(values)
    for p in (50, 90, 99, 99.9):
        exact = ordered[max(0, math.ceil(len(ordered) * p / 100 - 1e-9) - 1)]
        got = h.percentile(p)
        assert exact <= got <= exact * 1.01, (p, exact, got)
    assert h.percentile(100) == max(values)


def test_percentile_of_empty_histogram_is_zero() -> None:
    assert Histogram().percentile(99) == 0
    with pytest.raises(ValueError):
        Histogram().percentile(101)


def test_merge_equals_recording_everything_in_one() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for v in (5, 500, 5_000, 5_000_000):
        a.record(v)
        both.record(v)
    for v in (7, 70_000, 9_000_000_000):
        b.record(v)
        both.record(v)
    a.merge(b)
    assert a.counts == both.counts
    assert (a.count, a.total, a.min, a.max) == (both.count, both.total, both.min, both.max)


def test_histogram_round_trips_through_dict() -> None:
    h = Histogram()
    h.record_many([3, 300, 30_000, 3_000_000])
    again = Histogram.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again.counts == h.counts and again.count == 4 and again.max == 3_000_000


# -- report ----------------------------------------------------------------------------


def _spec(url: str = "tcp://127.0.0.1:9", **kw: object) -> LoadSpec:
    return LoadSpec(parse_endpoint(url), payload=b"x" * 64, **kw)  # type: ignore[arg-type]


def test_summary_has_the_documented_keys_in_microseconds() -> None:
    res = LoadResult(conns=2, elapsed=2.0, errors=1, timeouts=2)
    res.hist.record_many([100_000, 200_000, 300_000, 400_000])  # ns
    out = summary(res, _spec(conns=2))
    for key in ("rps", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "errors", "timeouts"):
        assert key in out
    assert out["rps"] == 2.0
    assert out["max_us"] == 400.0
    assert 199.0 <= out["p50_us"] <= 202.0  # type: ignore[operator]
    assert out["errors"] == 1 and out["timeouts"] == 2


def test_render_shows_table_and_histogram() -> None:
    res = LoadResult(conns=1, elapsed=1.0)
    res.hist.record_many([50_000] * 90 + [5_000_000] * 10)
    text = render(res, _spec(conns=1), unicode=False)
    assert "requests/s" in text and "p99.9" in text and "max" in text
    assert "latency histogram" in text
    bars = draw_histogram(res.hist, rows=8, unicode=False)
    assert len(bars) == 9
    assert sum(int(line.split()[-1].replace(",", "")) for line in bars[1:]) == 100


def test_fmt_latency_units() -> None:
    assert fmt_latency(87_000) == "87µs"
    assert fmt_latency(1_240_000) == "1.24ms"
    assert fmt_latency(2_500_000_000) == "2.5s"


def test_split_divides_conns_requests_and_rate() -> None:
    shares = split(_spec(conns=5, requests=11, rate=1000.0, duration=None), 2)
    assert [s.conns for s in shares] == [3, 2]
    assert [s.requests for s in shares] == [6, 5]
    assert [s.rate for s in shares] == [600.0, 400.0]
    with pytest.raises(ValueError):
        split(_spec(conns=1), 2)


# -- real runs -------------------------------------------------------------------------


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="ssb-", dir="/tmp"))
    yield str(d / "s.sock")
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _server(*urls: str, framing: str = "raw") -> ServerThread:
    cfg = ServerConfig(framing=framing)
    return ServerThread(Server(make_binding("timestamp", urls, cfg))).start()


def _bench_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["bench", *argv, "--json", "-q"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def _check_consistent(data: dict[str, object], n: int) -> None:
    assert data["requests"] == n
    assert data["errors"] == 0 and data["timeouts"] == 0
    p50, p99, mx = data["p50_us"], data["p99_us"], data["max_us"]
    assert isinstance(p50, float) and isinstance(p99, float) and isinstance(mx, float)
    assert 0 < p50 <= p99 <= mx
    assert data["rps"] > 0  # type: ignore[operator]


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_closed_loop_run_answers_exactly_n(capsys: pytest.CaptureFixture[str], scheme: str) -> None:
    st = _server(f"{scheme}://127.0.0.1:0")
    try:
        data = _bench_json(capsys, st.url(scheme), "-c", "4", "-n", "300")
    finally:
        st.stop()
    _check_consistent(data, 300)
    assert data["conns"] == 4 and data["size"] == 64


def test_unix_stream_run(capsys: pytest.CaptureFixture[str], sock_path: str) -> None:
    st = _server(f"unix://{sock_path}")
    try:
        data = _bench_json(capsys, st.url("unix"), "-c", "3", "-n", "200", "--message", "hi")
    finally:
        st.stop()
    _check_consistent(data, 200)


@pytest.mark.parametrize("framing", ["line", "length"])
def test_pipelined_framed_run(capsys: pytest.CaptureFixture[str], framing: str) -> None:
    st = _server("tcp://127.0.0.1:0", framing=framing)
    try:
        data = _bench_json(
            capsys, st.url("tcp"), "--framing", framing, "-c", "2", "--pipeline", "8", "-n", "400"
        )
    finally:
        st.stop()
    _check_consistent(data, 400)


def test_raw_pipeline_counts_replies_by_size(capsys: pytest.CaptureFixture[str]) -> None:
    # Echo-like reply size is known: 64-byte request -> 91-byte timestamp reply.
    st = _server("tcp://127.0.0.1:0")
    try:
        data = _bench_json(capsys, st.url("tcp"), "-c", "2", "--reply-size", "91", "-n", "100")
    finally:
        st.stop()
    _check_consistent(data, 100)


def test_open_loop_rate_run(capsys: pytest.CaptureFixture[str]) -> None:
    st = _server("tcp://127.0.0.1:0")
    try:
        data = _bench_json(capsys, st.url("tcp"), "-c", "2", "--rate", "2000", "-n", "200")
    finally:
        st.stop()
    _check_consistent(data, 200)
    assert data["rate"] == 2000.0


def test_duration_run_prints_report(capsys: pytest.CaptureFixture[str]) -> None:
    st = _server("tcp://127.0.0.1:0")
    try:
        assert main(["bench", st.url("tcp"), "-c", "2", "-d", "0.2", "-q"]) == 0
    finally:
        st.stop()
    out = capsys.readouterr().out
    assert "requests/s" in out and "latency histogram" in out


PROCS_ARGS = ("-c", "4", "--procs", "2", "-n", "400", "--json", "-q")


def test_procs_merge_worker_results() -> None:
    st = _server("tcp://127.0.0.1:0")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sockserve", "bench", st.url("tcp"), *PROCS_ARGS],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        st.stop()
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    _check_consistent(data, 400)
    assert data["procs"] == 2 and data["conns"] == 4


OPENSSL_REQ = ("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1")
OPENSSL_REQ += ("-subj", "/CN=localhost")


def test_tls_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    made = subprocess.run(
        [*OPENSSL_REQ, "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )
    require(made.returncode == 0, f"openssl cannot make a test certificate: {made.stderr!r}")
    cfg = ServerConfig(tls_cert=str(cert), tls_key=str(key))
    st = ServerThread(Server(make_binding("timestamp", ["tls://127.0.0.1:0"], cfg))).start()
    try:
        data = _bench_json(capsys, st.url("tls"), "--tls-insecure", "-c", "2", "-n", "100")
    finally:
        st.stop()
    _check_consistent(data, 100)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["tcp://127.0.0.1"], 2),  # no port
        (["ftp://127.0.0.1:21"], 2),  # unknown scheme
        (["tcp://127.0.0.1:9", "--pipeline", "4"], 2),  # raw needs --reply-size
        (["tcp://127.0.0.1:9", "-c", "1", "--procs", "2"], 2),
        (["unix:///nonexistent/bench.sock"], 3),
    ],
)
def test_error_exits_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int
) -> None:
    assert main(["bench", *argv, "-n", "1", "-q"]) == code
    err = capsys.readouterr().err
    assert err.startswith("sockserve bench: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_refused_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["bench", f"tcp://127.0.0.1:{port}", "-n", "1", "-q"]) == 3
    assert "cannot connect" in capsys.readouterr().err


def test_udp_without_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["bench", f"udp://127.0.0.1:{port}", "-n", "1", "-q", "--timeout", "1"]) == 3


def test_bad_option_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sockserve", "bench", "tcp://127.0.0.1:9", "-c", "zero"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--conns" in proc.stderr
