"""The pytest plugin as a user meets it: installed sockserve, a test file, no conftest, no set-up.

Each test runs pytest in a subprocess over a temp directory outside this repository,
so the ``sockserve_server`` fixture can only come from the ``pytest11`` entry point that
``pip install -e .`` registered.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

#: What a user writes: three lines of test, nothing else.
USER_TEST = """
import socket
import sys

import pytest
import sockserve

LOADED_AT_COLLECTION = sorted(m for m in sys.modules if m.startswith("sockserve."))
urls = []


def upper(request, ctx):
    return request.upper()


def test_upper(sockserve_server):
    srv = sockserve_server(upper, framing="line")
    with sockserve.connect(srv.url(), framing="line") as c:
        assert c.request(b"hi") == b"HI"
    urls.append(srv.url())


def test_the_plugin_imported_no_server_before_a_test_asked():
    assert LOADED_AT_COLLECTION == ["sockserve.pytest_plugin"]


def test_the_server_of_the_first_test_was_stopped_after_it():
    ep = sockserve.parse_endpoint(urls[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(ep.address(), timeout=10).close()


def test_several_servers_urls_and_settings(sockserve_server, tmp_path):
    a = sockserve_server("echo", "tcp://127.0.0.1:0", "udp://127.0.0.1:0")
    b = sockserve_server(upper, f"unix://{tmp_path}/s.sock", framing="length")
    assert a.url() != b.url()
    with sockserve.connect(a.url("udp")) as c:
        assert c.request(b"dgram") == b"dgram"
    with sockserve.connect(b.url("unix"), framing="length") as c:
        assert c.request(b"unix") == b"UNIX"


def test_errors_reach_the_test(sockserve_server):
    first = sockserve_server(upper)
    with pytest.raises(sockserve.EndpointError):
        sockserve_server(upper, first.url())
    with pytest.raises(sockserve.ConfigError, match="framng"):
        sockserve_server(upper, framng="line")
"""


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_fixture_example() -> str:
    """The README's pytest example: the python block that uses the fixture."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)
    (block,) = [b for b in blocks if "def test_" in b and "sockserve_server" in b]
    return str(block)


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.pop("PYTHONPATH", None)  # the user's project knows nothing of this repository's tests/
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_project(tmp_path: Path) -> Path:
    project = tmp_path / "userproject"
    project.mkdir()
    (project / "test_service.py").write_text(textwrap.dedent(USER_TEST))
    assert not (project / "conftest.py").exists()
    return project


def test_a_users_project_tests_a_service_with_the_fixture_and_no_setup(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    result = run_pytest(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout, result.stdout


def test_the_fixture_comes_from_the_entry_point(tmp_path: Path) -> None:
    # With the plugin turned off by its entry-point name, the fixture is unknown: so it
    # was the entry point, not anything on sys.path, that provided it.
    project = write_project(tmp_path)
    result = run_pytest(project, "-p", "no:sockserve", "-k", "test_upper")
    assert result.returncode != 0
    assert "fixture 'sockserve_server' not found" in result.stdout, result.stdout


def test_the_readme_example_passes_as_a_users_test_file(tmp_path: Path) -> None:
    project = tmp_path / "readme"
    project.mkdir()
    (project / "test_upper.py").write_text(readme_fixture_example())
    result = run_pytest(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
