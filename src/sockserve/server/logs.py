"""Structured logging: one line per connection event and error, text or JSON.

Loggers: ``sockserve.server`` (lifecycle), ``sockserve.conn`` (connection events),
``sockserve.service`` (handler errors). Events carry fields via ``extra=``
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


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Install one stderr handler on the ``sockserve`` logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    root = logging.getLogger("sockserve")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def fmt_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "unix-peer"
