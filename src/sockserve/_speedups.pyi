"""Types of the optional C helper (C sources: ``_speedups_c/``); its contract: ``sockserve._engine.fastio``."""

from typing import Any

MAX_BATCH: int
MAX_SIZE: int
MAX_EVENTS: int

def recv_batch(fd: int, count: int, size: int, /) -> list[tuple[bytes, Any]]: ...
def send_batch(fd: int, items: list[tuple[bytes, Any]], /) -> list[tuple[int, int]] | None: ...
def recv(fd: int, size: int, /) -> bytes: ...
def recv_into(fd: int, buffer: bytearray | memoryview, /) -> int: ...
def send(fd: int, data: bytes, /) -> int: ...
def poll_fast(
    epfd: int, maxevents: int, fast: dict[int, Any], /
) -> tuple[int, list[tuple[int, int, Any, Any]], BaseException | None]: ...
def tls_serve(
    fd: int,
    sslobj: Any,
    bio_in: Any,
    bio_out: Any,
    member: Any,
    handler: Any,
    ctx: Any,
    max_message: int,
    /,
) -> tuple[int, Any]: ...
