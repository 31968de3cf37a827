"""What ``sockserve serve`` runs in one process: services from the command line, a config
file or systemd's sockets, with SIGHUP reload and optional metrics.

A *unit* is one endpoint served by one service with its options; the server holds
one binding per unit. Reload (SIGHUP with ``--config``) re-reads the file and diffs
units by endpoint: unchanged ones are left alone (same socket, same connections);
removed ones stop accepting and drain; new ones are bound; an endpoint whose
service or options changed keeps its listening socket, which is handed to the new
binding at once while the old one drains its connections. A file that does not
parse, or a service that does not import, leaves everything running as it was.

The supervisor (``--workers``) runs one :class:`App` per worker process, with
sockets it opened or ports it reserved passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._engine.contracts import CloseReason
from .._engine.guards import AccessControl
from .._engine.runtime import StreamRuntime
from .._sighup import hold, take, take_stop
from ..config import ServerConfig
from ..endpoints import Endpoint
from ..errors import ConfigError, SockserveError
from ..logs import server_log
from ..server.binding import Binding
from ..server.listeners import Listener
from ..server.loop import log_loop_exception, new_event_loop
from ..server.server import Server
from ..server.tls import server_context
from ..settings import not_reloadable
from .plan import (
    AppSpec,
    Plan,
    Unit,
    build_binding,
    differences,
    load_tls,
    plan_units,
    server_config,
)

if TYPE_CHECKING:
    from .metrics import MetricsServer, MetricsState


class App:
    """One serving process: build, run until SIGTERM/SIGINT, reload on SIGHUP."""

    def __init__(
        self, spec: AppSpec, plan: Plan | None = None, channel: socket.socket | None = None
    ) -> None:
        from .metrics import MetricsState

        self.spec = spec
        self.plan = plan or Plan()
        self.channel = channel  # to the supervisor: metrics snapshots on request
        self.metrics: MetricsState | None = (
            MetricsState() if (spec.metrics or channel is not None) else None
        )
        self.units = plan_units(spec, self.plan)
        self.live: dict[Endpoint, tuple[Unit, Binding]] = {}
        bindings = []
        for u in self.units:
            b = build_binding(u, self.metrics)
            self.live[u.key] = (u, b)
            bindings.append(b)
        # Server-wide settings (max_conns, drain_timeout, busy_poll_us) go to the server.
        self.server = Server(*bindings, config=server_config(spec, self.units))
        self.metrics_http: MetricsServer | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._ready = False  # serving: a SIGHUP before this is queued, not acted on
        self._hup_queued = False

    # -- running -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a graceful drain, 1 if forced or an endpoint lost."""
        loop = new_event_loop(self.spec.loop)
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(log_loop_exception)
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)
        return 1 if self.server.forced or self.server.lost else 0

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        server = self.server
        # Before binding: a signal sent as soon as the first endpoint is logged must find its
        # handler. Handlers run on the loop, so only once start() has returned.
        server.install_signals(loop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._hup_queued |= take()  # one that came while we were importing or planning
        await server.start()
        try:
            stop = take_stop()  # a SIGTERM that came before our handlers: drain and exit 0
            if stop and server.signals is not None:
                server.signals.deliver(stop)
            if self.spec.metrics and self.channel is None:
                await self._start_metrics_http()
            if self.channel is not None:
                threading.Thread(
                    target=self._serve_channel, name="sockserve-metrics-channel", daemon=True
                ).start()
            self._ready = True
            if self._hup_queued:
                self._on_sighup()
            assert server._stop_requested is not None
            await server._stop_requested.wait()
        finally:
            if self.channel is not None:
                with contextlib.suppress(OSError):
                    self.channel.shutdown(socket.SHUT_RDWR)  # wakes the channel thread
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)
            hold()  # not the default (fatal) action while draining: a late reload is ignored
            await server.stop()
            if self.metrics_http is not None:
                self.metrics_http.close()

    async def _start_metrics_http(self) -> None:
        from .metrics import MetricsServer, open_metrics_socket, registry_for

        metrics = self.metrics
        assert metrics is not None and self.spec.metrics is not None
        render = registry_for(lambda: metrics.snapshot(self.server))
        self.metrics_http = MetricsServer(open_metrics_socket(self.spec.metrics), render)
        await self.metrics_http.start()  # logs its URL

    def _serve_channel(self) -> None:
        """Answer the supervisor's snapshot requests: each byte in, one length-prefixed JSON out.

        A thread of its own, not a reader on the loop: a handler that blocks the loop
        must not make the supervisor wait, nor leave it with stale counts of ours.
        The counters are plain ints and lists read whole under the GIL. A snapshot that
        fails is answered with an empty frame (the supervisor keeps our last one).
        """
        channel, metrics = self.channel, self.metrics
        assert channel is not None and metrics is not None
        channel.setblocking(True)
        try:
            while asks := channel.recv(64):
                for _ in asks:
                    try:
                        data = json.dumps(metrics.snapshot(self.server)).encode()
                    except Exception:
                        server_log.exception("metrics: snapshot for the supervisor failed")
                        data = b""
                    channel.sendall(len(data).to_bytes(4, "big") + data)
        except OSError as exc:
            if not self.server._stopping:
                server_log.warning("metrics channel to the supervisor failed: %s", exc)

    # -- reloading -----------------------------------------------------------------------

    def _on_sighup(self) -> None:
        if not self._ready:
            self._hup_queued = True  # reloaded once serving: the file may change meanwhile
            return
        if not self.spec.config_file:
            server_log.info(
                "SIGHUP received: no --config file to reload; ignoring", extra={"event": "signal"}
            )
            return
        server_log.info(
            "SIGHUP received: reloading %s", self.spec.config_file, extra={"event": "signal"}
        )
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def reload(self) -> dict[str, int]:
        """Apply the config file again; returns how many units were added/removed/changed/kept.

        Everything that can fail (the file, imports, options, TLS certificates) is
        checked before anything running is touched: a failure changes nothing. A changed
        endpoint keeps its listening socket (its ``backlog`` and ``unix_mode`` are applied
        to it) and its open connections, which are served as they were accepted until they
        close; connections the new ``allow``/``deny`` refuse are closed once the requests
        they sent are answered. ``max_conns`` and ``drain_timeout`` are recomputed.
        Certificates of unchanged tls:// endpoints are read again (renewed files).
        """
        try:
            units = plan_units(self.spec, self.plan)
            new = {u.key: u for u in units}
            changed_or_added = [
                u for u in units if u.key not in self.live or not self.live[u.key][0].same_as(u)
            ]
            built = {u.key: build_binding(u, self.metrics) for u in changed_or_added}
            for binding in built.values():
                load_tls(binding)
            wide = server_config(self.spec, units)
        except SockserveError as exc:
            server_log.error(
                "reload failed, still serving the previous configuration: %s",
                exc,
                extra={"event": "reload_failed"},
            )
            return {}
        self._warn_restart_only(units, wide)
        self.server.reconfigure(wide)  # before the diff: add_binding resumes at a raised limit
        counts = {"added": 0, "removed": 0, "changed": 0, "unchanged": 0}
        for key in [k for k in self.live if k not in new]:
            _, old = self.live.pop(key)
            self._retire(old, keep=())
            server_log.info("reload: %s removed; draining it", key, extra={"event": "reload"})
            counts["removed"] += 1
        for key, unit in new.items():
            if key not in built:
                counts["unchanged"] += 1
                self._refresh_tls(*self.live[key])
                continue
            binding = built[key]
            if key in self.live:
                old_unit, old = self.live[key]
                old_runtimes = self.server.runtimes_of(old)
                kept = self._retire(old, keep=[old_unit.endpoint], keep_conns=True)
                lst = kept.get(old_unit.endpoint)
                if lst is not None:
                    _apply_listener_options(lst, old_unit.config, unit.config)
                    binding.listeners[unit.endpoint] = lst
                if not self._add(binding, key):
                    if lst is not None:  # put the old service back on its socket
                        _apply_listener_options(lst, unit.config, old_unit.config)
                        old.listeners[old_unit.endpoint] = lst
                        if self._add(old, key):
                            self.live[key] = (old_unit, old)
                            continue
                    del self.live[key]
                    continue
                server_log.info(
                    "reload: %s changed (%s); open connections keep their settings until they close",
                    key,
                    ", ".join(differences(old_unit, unit)),
                    extra={"event": "reload"},
                )
                _close_denied(old_runtimes, unit.config)
                counts["changed"] += 1
            else:
                if not self._add(binding, key):
                    continue
                counts["added"] += 1
            self.live[key] = (unit, binding)
        server_log.info(
            "reloaded %s: %d added, %d removed, %d changed, %d unchanged",
            self.spec.config_file,
            counts["added"],
            counts["removed"],
            counts["changed"],
            counts["unchanged"],
            extra={"event": "reloaded"},
        )
        return counts

    def _warn_restart_only(self, units: list[Unit], wide: ServerConfig) -> None:
        """Log the changed settings a reload cannot apply (declared not reloadable)."""
        before = {u.key: u.config for u, _ in self.live.values()}
        changed = {
            name
            for u in units
            if u.key in before
            for name in not_reloadable(differences_of(before[u.key], u.config))
        }
        changed.update(not_reloadable(differences_of(self.server.config, wide)))
        if changed:
            server_log.warning(
                "reload: %s changed, which takes full effect only after a restart",
                ", ".join(sorted(changed)),
                extra={"event": "reload_restart_needed"},
            )

    def _refresh_tls(self, unit: Unit, binding: Binding) -> None:
        """Read an unchanged tls:// endpoint's certificate again; keep the old one if that fails."""
        if binding.ssl_context is None:
            return
        cfg = unit.config
        try:
            ctx = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        except ConfigError as exc:
            server_log.error(
                "reload: %s: keeping the certificate already loaded: %s",
                unit.key,
                exc,
                extra={"event": "reload_failed"},
            )
            return
        binding.ssl_context = ctx
        for rt in self.server.runtimes_of(binding):
            if isinstance(rt, StreamRuntime) and rt.ssl_context is not None:
                rt.ssl_context = ctx  # new handshakes; open connections keep theirs

    def _add(self, binding: Binding, key: Endpoint) -> bool:
        try:
            self.server.add_binding(binding)
        except SockserveError as exc:
            server_log.error(
                "reload: cannot serve %s: %s", key, exc, extra={"event": "reload_failed"}
            )
            return False
        return True

    def _retire(
        self, binding: Binding, keep: Sequence[Endpoint], keep_conns: bool = False
    ) -> dict[Endpoint, Listener]:
        runtimes = self.server.runtimes_of(binding)
        kept, task = self.server.remove_binding(binding, keep=keep, keep_conns=keep_conns)
        if self.metrics is not None:
            metrics = self.metrics
            task.add_done_callback(lambda _: metrics.retire(runtimes))
        return kept


def _apply_listener_options(lst: Listener, old: ServerConfig, new: ServerConfig) -> None:
    """What a kept listening socket must change: its backlog and its Unix file's mode."""
    ep = lst.endpoint
    try:
        if ep.is_stream and new.backlog != old.backlog:
            lst.sock.listen(new.backlog)
        if ep.is_unix and not ep.path.startswith("@") and new.unix_mode != old.unix_mode:
            os.chmod(ep.path, new.unix_mode if new.unix_mode is not None else _default_mode())
    except OSError as exc:
        server_log.error(
            "reload: %s: cannot apply the new socket options: %s",
            ep,
            exc.strerror or exc,
            extra={"event": "reload_failed"},
        )


def _default_mode() -> int:
    """The mode bind() gives a new socket file: 0777 less the umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _close_denied(runtimes: Sequence[object], config: ServerConfig) -> None:
    """Close (after answering what they sent) kept connections the new rules refuse."""
    access = AccessControl(config.allow, config.deny)
    if not access.active:
        return
    for rt in runtimes:
        if not isinstance(rt, StreamRuntime):
            continue
        for conn in list(rt.conns):
            peer = conn.ctx.peer
            if isinstance(peer, tuple) and not access.permits(peer[0]):
                rt.note_close_reason(conn, CloseReason.DENIED, "by the reloaded allow/deny rules")
                conn.drain()


def differences_of(old: ServerConfig, new: ServerConfig) -> list[str]:
    """The names of the settings that differ between two configs."""
    return [n for n, v in vars(old).items() if getattr(new, n) != v]


__all__ = ["App", "AppSpec", "Plan", "Unit", "build_binding", "plan_units"]
