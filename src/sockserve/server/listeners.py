"""Open listening sockets for endpoints: bind, listen, Unix file hygiene.

Error handling: OS errors become :class:`EndpointError` naming the endpoint and
what to do. Resource handling: a socket whose bind fails is closed before the
error propagates, and :func:`close_listener` removes a Unix socket file only if
it is still the one we created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from ..endpoints import Endpoint
from ..errors import ConfigError, EndpointError


@dataclass
class Listener:
    """A bound socket and the endpoint it really serves (port 0 resolved)."""

    sock: socket.socket
    endpoint: Endpoint
    #: (st_dev, st_ino) of the Unix socket file we created, to remove it safely on exit.
    unix_file: tuple[int, int] | None = None


def open_listener(
    endpoint: Endpoint,
    *,
    backlog: int,
    reuse_port: bool = False,
    unix_mode: int | None = None,
) -> Listener:
    if endpoint.is_unix:
        return _open_unix(endpoint, backlog, unix_mode)
    return _open_inet(endpoint, backlog, reuse_port)


def check_unix_mode(endpoint: Endpoint, unix_mode: int | None) -> None:
    """Refuse ``unix_mode`` on an abstract socket: it has no file, so no mode to set.

    Refused rather than ignored, so nobody believes a mode protects an abstract name
    (any process in the network namespace can connect to one).
    """
    if unix_mode is not None and endpoint.is_unix and endpoint.path.startswith("@"):
        raise ConfigError(
            f"{endpoint}: --unix-mode cannot apply to an abstract socket (it has no file "
            "and no permissions); use a path, or drop --unix-mode"
        )


def _resolve(endpoint: Endpoint) -> tuple[int, tuple[str, int]]:
    if endpoint.is_dualstack:
        # One [::] socket that takes IPv4 too (as ::ffff:a.b.c.d); 0.0.0.0 without IPv6.
        if socket.has_ipv6:
            return socket.AF_INET6, ("::", endpoint.port)
        return socket.AF_INET, ("0.0.0.0", endpoint.port)
    socktype = socket.SOCK_STREAM if endpoint.is_stream else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(
            endpoint.host, endpoint.port, socket.AF_UNSPEC, socktype, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise EndpointError(
            f"{endpoint}: cannot resolve host {endpoint.host!r}: {exc.strerror}"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def _open_inet(endpoint: Endpoint, backlog: int, reuse_port: bool) -> Listener:
    dualstack = endpoint.is_dualstack
    family, addr = _resolve(endpoint)
    socktype = socket.SOCK_STREAM if endpoint.is_stream else socket.SOCK_DGRAM
    sock = socket.socket(family, socktype)
    try:
        if endpoint.is_stream:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise EndpointError(f"{endpoint}: SO_REUSEPORT is not available on this system")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Bind [::] to IPv6 only, so a separate 0.0.0.0 listener can coexist; the
            # dual-stack form tcp://*:PORT asks for both on one socket.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise EndpointError(f"{endpoint}: cannot bind: {_explain(exc)}") from None
        if endpoint.is_stream:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    return Listener(sock, Endpoint(endpoint.scheme, host="*" if dualstack else host, port=port))


def _open_unix(endpoint: Endpoint, backlog: int, unix_mode: int | None) -> Listener:
    check_unix_mode(endpoint, unix_mode)
    socktype = socket.SOCK_STREAM if endpoint.is_stream else socket.SOCK_DGRAM
    path = endpoint.path
    abstract = path.startswith("@")
    if not abstract:
        _remove_stale(endpoint)
    sock = socket.socket(socket.AF_UNIX, socktype)
    unix_file = None
    try:
        try:
            sock.bind(endpoint.address())
        except OSError as exc:
            raise EndpointError(f"{endpoint}: cannot bind: {_explain(exc)}") from None
        if not abstract:
            st = os.stat(path)
            unix_file = (st.st_dev, st.st_ino)
            if unix_mode is not None:
                os.chmod(path, unix_mode)
        if endpoint.is_stream:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if unix_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return Listener(sock, endpoint, unix_file)


def _remove_stale(endpoint: Endpoint) -> None:
    """Remove a leftover socket file nobody serves; refuse anything else, naming the path.

    A path is stale only when it is a socket (not a regular file, not a symlink: those
    are never removed) and refuses connections of both types with ECONNREFUSED. A
    socket of the other type answers the probe of its own type (and fails the other
    with EPROTOTYPE), so a live ``unix://`` server is never taken for a stale
    ``unixgram://`` file, or the other way round.
    """
    path = endpoint.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise EndpointError(
            f"{endpoint}: {path} exists and is {what}; remove it or pick another path"
        )
    for socktype in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        answer = _probe(path, socktype)
        if answer is not None:
            raise EndpointError(f"{endpoint}: {answer}; stop that server or pick another path")
    # Both refused: nobody holds the socket. Remove it only if it is still the file probed.
    with contextlib.suppress(FileNotFoundError):
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)


def _probe(path: str, socktype: int) -> str | None:
    """Connect to ``path`` as ``socktype``: ``None`` if refused (nobody there), else what answered."""
    kind = "stream" if socktype == socket.SOCK_STREAM else "datagram"
    probe = socket.socket(socket.AF_UNIX, socktype)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            other = "datagram" if kind == "stream" else "stream"
            return f"another server is listening on {path} (a {other} socket is bound to it)"
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(exc, TimeoutError):
            return f"another server is listening on {path} (stream, its backlog full)"
        return f"cannot check existing socket file {path} as {kind}: {exc.strerror or exc}"
    finally:
        probe.close()
    return f"another server is listening on {path} (a {kind} socket answered)"


def close_listener(listener: Listener) -> None:
    listener.sock.close()
    unlink_socket_file(listener)


def unlink_socket_file(listener: Listener) -> None:
    """Remove a Unix listener's socket file if it is still the one it bound (not a successor's)."""
    if listener.unix_file is None:
        return
    path = listener.endpoint.path
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == listener.unix_file:
            os.unlink(path)


def _explain(exc: OSError) -> str:
    hints = {
        errno.EADDRINUSE: "address already in use (another server? pick another port or stop it)",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "address not available on this machine",
        errno.ENOENT: "directory does not exist",
    }
    return hints.get(exc.errno or 0, exc.strerror or str(exc))


def adopt_socket(sock: socket.socket) -> Listener:
    """Serve a socket opened elsewhere (systemd, a supervisor): its endpoint is read from it.

    Error handling: a socket that is not a listening stream or a bound datagram socket of
    a family we serve raises :class:`EndpointError` naming its file descriptor.
    Resource handling: the :class:`Listener` owns ``sock`` but never removes a Unix
    socket file for it (whoever created the file does).
    """
    fd = sock.fileno()
    stream = sock.type == socket.SOCK_STREAM
    if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise EndpointError(f"fd {fd}: socket type {sock.type!r} is neither stream nor datagram")
    if stream and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise EndpointError(
            f"fd {fd}: a stream socket that is not listening (systemd Accept=yes passes "
            "connections; sockserve needs Accept=no)"
        )
    name = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        endpoint = Endpoint("tcp" if stream else "udp", host=name[0], port=name[1])
    elif sock.family == socket.AF_UNIX:
        # Abstract names come back as bytes with a leading NUL.
        path = "@" + name[1:].decode(errors="surrogateescape") if isinstance(name, bytes) else name
        if not path:
            raise EndpointError(f"fd {fd}: an unbound Unix socket")
        endpoint = Endpoint("unix" if stream else "unixgram", path=path)
    else:
        raise EndpointError(f"fd {fd}: socket family {sock.family!r} is not served")
    sock.setblocking(False)
    return Listener(sock, endpoint)
