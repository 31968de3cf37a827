"""Structured logging: one line per connection event and error, text or JSON.

Loggers: ``sockserve.server`` (lifecycle), ``sockserve.conn`` (connection events),
``sockserve.service`` (handler errors), ``sockserve.trace`` (``--trace`` hex dumps). Events carry fields via ``extra=``
(``event``, ``endpoint``, ``peer``, ``reason``) which the JSON format emits as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

server_log = logging.getLogger("sockserve.server")
conn_log = logging.getLogger("sockserve.conn")
service_log = logging.getLogger("sockserve.service")
trace_log = logging.getLogger("sockserve.trace")

#: The per-connection "access log" lines ``--no-access-log`` drops (uvicorn's access log
#: is per request; sockserve's raw streams have no requests a proxy would log, so it is
#: per connection). Warnings (protocol errors) and denials are kept.
ACCESS_EVENTS = frozenset({"open", "close"})

_FIELDS = ("event", "endpoint", "peer", "reason", "service", "framing")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _NoAccessLog(logging.Filter):
    """Drops the info-level open/close lines; keeps every warning and error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or getattr(record, "event", None) not in ACCESS_EVENTS


_NO_ACCESS = _NoAccessLog()


def configure_logging(fmt: str = "text", level: str = "info", access_log: bool = True) -> None:
    """Install one stderr handler on the ``sockserve`` logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_text_formatter())
    root = logging.getLogger("sockserve")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    set_access_log(access_log)


def set_access_log(on: bool) -> None:
    """Turn the per-connection open/close lines on or off (``--no-access-log``)."""
    conn_log.removeFilter(_NO_ACCESS)
    if not on:
        conn_log.addFilter(_NO_ACCESS)


def _text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")


def ensure_logging() -> None:
    """For ``sockserve.serve()`` from code: log as the CLI does unless the user set logging up.

    As uvicorn does when run from code: if neither the root logger nor ``sockserve``'s
    has a handler, one stderr handler goes on ``sockserve`` (level info, so the
    "listening on" lines show); a program that configured logging keeps its own setup.
    """
    root = logging.getLogger()
    ours = logging.getLogger("sockserve")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_text_formatter())
    ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)


def fmt_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "unix-peer"


def hexdump(data: bytes, indent: str = "  ") -> str:
    """``hexdump -C`` style lines: offset, 16 bytes in hex, the printable ASCII."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        if len(chunk) > 8:
            hexes = hexes[:23] + " " + hexes[23:]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{indent}{off:08x}  {hexes:<49} |{text}|")
    return "\n".join(lines)


def trace(endpoint: object, peer: Any, direction: str, data: bytes | None) -> None:
    """Log one message crossing the wire (``--trace``): a header line, then its hex dump."""
    if not trace_log.isEnabledFor(logging.INFO):
        return
    who = fmt_peer(peer)
    if data is None:
        trace_log.info("%s: %s %s: no reply", endpoint, direction, who, extra={"event": "trace"})
        return
    trace_log.info(
        "%s: %s %s (%d bytes)%s",
        endpoint,
        direction,
        who,
        len(data),
        "\n" + hexdump(data) if data else "",
        extra={"event": "trace", "endpoint": endpoint, "peer": who},
    )
