"""What a load run is asked to do and what it measured: plain data, no sockets.

:class:`LoadSpec` is one process's share of a run (``--procs`` splits one into
several, see :mod:`.procs`); :class:`LoadResult` is what one engine measured,
merged across processes and carried between them as JSON (:meth:`LoadResult.to_dict`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..endpoints import Endpoint
from ..framing import DEFAULT_MAX_MESSAGE, make_codec
from .histogram import Histogram

#: Live progress: (seconds measured, or -1 while warming up; answered; errors; timeouts).
Progress = Callable[[float, int, int, int], None]


@dataclass(frozen=True)
class TlsOptions:
    """The client side of ``tls://``: CA, client certificate, verification (``--tls-*``)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    server_hostname: str | None = None

    def client_keywords(self) -> dict[str, Any]:
        """These options under the names :class:`~sockserve.client.Client` gives them."""
        tls = {f"tls_{name}": getattr(self, name) for name in ("ca", "cert", "key", "verify")}
        return {**tls, "server_hostname": self.server_hostname}


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, how hard and for how long (one process's share)."""

    endpoint: Endpoint
    payload: bytes
    conns: int = 50
    duration: float | None = 10.0  #: seconds measured; ignored when ``requests`` is set
    requests: int | None = None  #: stop after this many requests complete
    pipeline: int = 1
    rate: float | None = None  #: requests/s for the open loop; None = closed loop
    framing: str = "raw"
    reply_size: int | None = None  #: raw framing: bytes per reply (None: one chunk = one reply)
    timeout: float | None = 5.0
    warmup: float = 0.0
    max_message: int = DEFAULT_MAX_MESSAGE
    tls: TlsOptions = field(default_factory=TlsOptions)

    @property
    def wire_request(self) -> bytes:
        """The request as it goes on the wire: the payload framed (datagrams: as is)."""
        if not self.endpoint.is_stream:
            return self.payload
        return make_codec(self.framing, max(self.max_message, len(self.payload))).encode(
            self.payload
        )


@dataclass
class LoadResult:
    """What one engine (one process) measured; :meth:`merge` folds workers together."""

    hist: Histogram = field(default_factory=Histogram)
    errors: int = 0
    timeouts: int = 0
    elapsed: float = 0.0  #: seconds measured (warm-up excluded)
    conns: int = 0
    reconnects: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    aborted: str | None = None
    interrupted: bool = False  #: stopped early by Ctrl-C: a partial, but true, measurement

    @property
    def requests(self) -> int:
        return self.hist.count

    @property
    def rps(self) -> float:
        return self.hist.count / self.elapsed if self.elapsed > 0 else 0.0

    def note_error(self, reason: str, n: int = 1) -> None:
        self.errors += n
        self.error_reasons[reason] = self.error_reasons.get(reason, 0) + n

    def merge(self, other: LoadResult) -> None:
        self.hist.merge(other.hist)
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.elapsed = max(self.elapsed, other.elapsed)
        self.conns += other.conns
        self.reconnects += other.reconnects
        for k, v in other.error_reasons.items():
            self.error_reasons[k] = self.error_reasons.get(k, 0) + v
        self.aborted = self.aborted or other.aborted
        self.interrupted = self.interrupted or other.interrupted

    def to_dict(self) -> dict[str, object]:
        return {
            "hist": self.hist.to_dict(),
            "errors": self.errors,
            "timeouts": self.timeouts,
            "elapsed": self.elapsed,
            "conns": self.conns,
            "reconnects": self.reconnects,
            "error_reasons": self.error_reasons,
            "aborted": self.aborted,
            "interrupted": self.interrupted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LoadResult:
        hist = d["hist"]
        assert isinstance(hist, dict)
        reasons = d.get("error_reasons") or {}
        assert isinstance(reasons, dict)
        aborted = d.get("aborted")
        return cls(
            hist=Histogram.from_dict(hist),
            errors=int(d["errors"]),  # type: ignore[call-overload]
            timeouts=int(d["timeouts"]),  # type: ignore[call-overload]
            elapsed=float(d["elapsed"]),  # type: ignore[arg-type]
            conns=int(d["conns"]),  # type: ignore[call-overload]
            reconnects=int(d["reconnects"]),  # type: ignore[call-overload]
            error_reasons={str(k): int(v) for k, v in reasons.items()},
            aborted=str(aborted) if aborted else None,
            interrupted=bool(d.get("interrupted")),
        )
