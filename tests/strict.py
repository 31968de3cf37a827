"""The one place a test may decline to run: ``require`` / ``needs``.

On a developer's laptop a missing tool (haproxy, ncat, inetd...), a non-root run, a
failed ``[::1]`` bind or no network namespace skips the test with the reason. Under
``CI=true`` the same condition FAILS the test: CI installs every tool and runs as
root, so a skip there would hide a broken setup (the CI skip count must be 0).
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: object, reason: str) -> None:
    """Go on if ``condition`` holds; otherwise fail under CI=true, skip elsewhere."""
    if condition:
        return
    if CI:
        pytest.fail(f"CI=true and a test prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def needs(condition: object, reason: str) -> pytest.MarkDecorator:
    """``require`` as a mark (for a test, a module's pytestmark or a ``pytest.param``);
    conftest.py checks it before the test runs."""
    return pytest.mark.requires(bool(condition), reason)


def tool(name: str, *fallbacks: str) -> str | None:
    """The path of a command-line tool, or None."""
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in fallbacks if os.path.exists(p)), None)


def ipv6_loopback_error() -> str | None:
    """Why ``[::1]`` cannot be bound here (the OS's own words), or None when it can."""
    if not socket.has_ipv6:
        return "this Python has no IPv6 support"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind [::1]: {exc}"
    return None


IS_ROOT = os.geteuid() == 0
needs_root = needs(IS_ROOT, "needs root")
needs_ipv6 = needs(ipv6_loopback_error() is None, ipv6_loopback_error() or "")
