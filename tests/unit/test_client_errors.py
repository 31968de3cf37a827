"""The client error types and their wording: pure, no sockets.

``RequestTimeout`` is a builtin ``TimeoutError`` and ``ConnectError`` a ``ConnectionError``,
so code that already catches those catches ours; both keep ``"ENDPOINT: REASON"`` as their
text, carry ``errno``, pickle (bench workers send them across processes), and map to the
CLI exit codes by meaning (a connect timeout is "cannot connect", 3).
"""

from __future__ import annotations

import errno
import pickle

import pytest

import sockserve
from sockserve.cli.common import exit_code
from sockserve.cli.exits import EXIT_CLOSED, EXIT_CONNECT, EXIT_TIMEOUT, EXIT_USAGE
from sockserve.client import common
from sockserve.errors import ClientError, ConnectError, ConnectionClosed, RequestTimeout

URL = "tcp://127.0.0.1:9"


def test_request_timeout_is_a_builtin_timeout_error() -> None:
    exc = common.timed_out(URL, 1.5)
    assert isinstance(exc, RequestTimeout) and isinstance(exc, TimeoutError)
    assert isinstance(exc, sockserve.ClientError) and isinstance(exc, OSError)
    assert not isinstance(exc, ConnectionError)
    with pytest.raises(TimeoutError, match=r"^tcp://127\.0\.0\.1:9: no reply within 1\.5s$"):
        raise exc


def test_connect_error_is_a_builtin_connection_error() -> None:
    exc = common.connect_failed(URL, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert isinstance(exc, ConnectError) and isinstance(exc, ConnectionError)
    assert not isinstance(exc, TimeoutError)
    assert exc.errno == errno.ECONNREFUSED
    assert str(exc) == f"{URL}: connection refused (is the server running?)"
    assert (exc.endpoint, exc.reason) == (URL, "connection refused (is the server running?)")
    with pytest.raises(ConnectionError):
        raise exc


def test_a_connect_timeout_is_a_connect_error_naming_endpoint_and_timeout() -> None:
    exc = common.connect_timed_out(URL, 0.25, tls=False)
    assert isinstance(exc, ConnectError) and isinstance(exc, ConnectionError)
    assert not isinstance(exc, RequestTimeout)
    assert str(exc).startswith(f"{URL}: connect not done within 0.25s")
    assert exc.errno == errno.ETIMEDOUT
    assert "TLS handshake" in str(common.connect_timed_out("tls://h:1", 2, tls=True))


def test_exit_codes_follow_meaning_not_class() -> None:
    # Mutation: connect_timed_out returning a RequestTimeout (as before) makes the first 4.
    assert exit_code(common.connect_timed_out(URL, 1, tls=False)) == EXIT_CONNECT == 3
    assert exit_code(common.timed_out(URL, 1)) == EXIT_TIMEOUT == 4
    assert exit_code(common.closed_before_reply(URL)) == EXIT_CLOSED == 5
    assert exit_code(common.connect_failed(URL, FileNotFoundError(errno.ENOENT, "x"))) == 3
    assert exit_code(sockserve.EndpointError("bad")) == EXIT_USAGE


@pytest.mark.parametrize(
    "exc",
    [
        ConnectError(URL, "connection refused", errno.ECONNREFUSED),
        RequestTimeout(URL, "no reply within 1s", errno.ETIMEDOUT),
        ConnectionClosed(URL, "server closed the connection before replying"),
        ClientError("load worker", "boom"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_client_errors_pickle_with_their_fields(exc: ClientError) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert (back.endpoint, back.reason, back.errno, str(back)) == (
        exc.endpoint,
        exc.reason,
        exc.errno,
        str(exc),
    )


def test_no_timeout_set_still_words_a_timeout() -> None:
    """The kernel's own ETIMEDOUT with ``timeout=None``: a message, not a format error."""
    assert "before the system's limit" in str(common.timed_out(URL, None))
    assert "before the system's limit" in str(common.connect_timed_out(URL, None, tls=False))


def test_raw_timeout_says_how_raw_replies_end() -> None:
    msg = str(common.timed_out(URL, 2, common.incomplete(7), raw=True))
    assert "reply not complete (7 bytes) within 2s" in msg
    assert "--framing line/length or --reply-size" in msg
    assert str(common.timed_out(URL, 2, common.incomplete(0))) == f"{URL}: no reply within 2s"


def test_os_reasons_say_what_to_check() -> None:
    assert common.os_reason(FileNotFoundError(errno.ENOENT, "x")) == "no such socket file"
    assert common.os_reason(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    assert common.os_reason(OSError()) == "OSError"
