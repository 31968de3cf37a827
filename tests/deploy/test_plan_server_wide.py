"""The serve plan gives the server its server-wide settings, and a reload names the changed
settings that only a restart applies (the declaration's ``reloadable`` mark)."""

from __future__ import annotations

import signal
from pathlib import Path

from deploy_helpers import serve_proc

from sockserve.config import ServerConfig
from sockserve.deploy.app import App
from sockserve.deploy.plan import AppSpec


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_the_server_gets_the_server_wide_config(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    write(
        cfg,
        '[[service]]\nname = "echo"\nlisten = ["tcp://127.0.0.1:0"]\nmax_conns = 9\n'
        '[[service]]\nname = "timestamp"\nlisten = ["udp://127.0.0.1:0"]\nmax_conns = 4\n'
        "drain_timeout = 1.5\nbusy_poll_us = 70\n",
    )
    app = App(AppSpec(config=ServerConfig(drain_timeout=3.0), config_file=str(cfg)))
    wide = app.server.config
    assert (wide.max_conns, wide.drain_timeout, wide.busy_poll_us) == (4, 3.0, 70)
    assert (app.server.max_conns, app.server.drain_timeout) == (4, 3.0)
    assert app.server.listeners == []  # planned, not bound


def test_reload_names_the_settings_only_a_restart_applies(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"

    def config(extra: str) -> None:
        write(cfg, f'[[service]]\nname = "echo"\nlisten = ["tcp://127.0.0.1:0"]\n{extra}')

    config('engine = "asyncio"\nbusy_poll_us = 10\n')
    with serve_proc("--config", str(cfg)) as p:
        p.endpoints(1)
        config('engine = "auto"\nbusy_poll_us = 20\nidle_timeout = 5\n')
        p.signal(signal.SIGHUP)
        p.wait_log(r"reloaded ")
        assert (
            "reload: busy_poll_us, engine changed, which takes full effect only after a restart"
        ) in p.log
        config('engine = "auto"\nbusy_poll_us = 20\nidle_timeout = 6\n')
        p.signal(signal.SIGHUP)
        p.wait_log(r"reloaded ", 2)
        assert p.log.count("only after a restart") == 1  # idle_timeout applies: no warning
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
