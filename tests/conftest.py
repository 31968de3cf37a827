"""Shared fixtures: servers on port 0 in a background thread, and the CLI as a subprocess."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockserve.server import ServerThread


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    """``serve(service, *urls, **config)`` starts a server and stops it after the test."""
    started: list[ServerThread] = []

    def start(service: Any = "timestamp", *urls: str, **options: Any) -> ServerThread:
        st = ServerThread(service, *(urls or ("tcp://127.0.0.1:0",)), **options)
        st.start()
        started.append(st)
        return st

    yield start
    for st in started:
        st.stop()


@pytest.fixture
def sock_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short temp dir for Unix sockets (sun_path holds 107 bytes)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    yield d  # type: ignore[misc]
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A throwaway PKI (CA, server cert for 127.0.0.1/::1/localhost, good and rogue client certs)."""
    from faultkit import make_certs

    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server_logs() -> Iterator[Any]:
    """Every record the ``sockserve`` loggers emit during the test, whatever the propagation."""
    import logging

    from faultkit import LogTap

    tap = LogTap()
    logger = logging.getLogger("sockserve")
    old_level = logger.level
    logger.addHandler(tap)
    logger.setLevel(logging.DEBUG)
    yield tap
    logger.removeHandler(tap)
    logger.setLevel(old_level)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(condition, reason): skip without it, but FAIL under CI=true (tests/strict.py)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Check every ``strict.needs`` mark: a skip on a laptop, a failure under CI=true."""
    from strict import require

    for mark in item.iter_markers("requires"):
        require(mark.args[0], mark.args[1])


@pytest.fixture
def netns() -> Iterator[str]:
    """The test runs in a private network namespace; yields its non-loopback address."""
    from netns import private_netns

    with private_netns() as addr:
        yield addr
