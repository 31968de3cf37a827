"""The settings declaration is the one source: ServerConfig, ``serve``'s options, the TOML keys
and docs/configuration.md all follow it, so none can drift from the others."""

from __future__ import annotations

import argparse
import dataclasses
import re
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from sockserve.cli.serve import add_arguments, build_config
from sockserve.config import ServerConfig
from sockserve.deploy.configfile import OPTION_KEYS, parse_config
from sockserve.deploy.plan import AppSpec, Unit, server_config
from sockserve.endpoints import parse_endpoint
from sockserve.errors import ConfigError
from sockserve.settings import BY_NAME, SERVER_WIDE, SETTINGS, not_reloadable, settings_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

#: For each setting: words after its option, the TOML value, and the ServerConfig value both
#: must give. A new setting without a row here fails test_every_setting_has_a_sample.
SAMPLES: dict[str, tuple[list[str], Any, Any]] = {
    "framing": (["line"], "line", "line"),
    "max_message": (["2K"], "2K", 2048),
    "idle_timeout": (["0"], 0, None),
    "max_conns": (["7"], 7, 7),
    "backlog": (["9"], 9, 9),
    "drain_timeout": (["1.5"], 1.5, 1.5),
    "write_high_water": (["128K"], "128K", 131072),
    "write_low_water": (["1K"], 1024, 1024),
    "allow": (["10.0.0.0/8"], ["10.0.0.0/8"], (ip_network("10.0.0.0/8"),)),
    "deny": (["::1"], "::1", (ip_network("::1/128"),)),
    "unix_mode": (["640"], "640", 0o640),
    "tls_cert": (["c.pem"], "c.pem", "c.pem"),
    "tls_key": (["k.pem"], "k.pem", "k.pem"),
    "tls_client_ca": (["ca.pem"], "ca.pem", "ca.pem"),
    "tls_handshake_timeout": (["3"], 3, 3.0),
    "max_handshakes": (["0"], 0, 0),
    "udp_min_source_port": (["0"], 0, 0),
    "udp_rate": (["2.5"], 2.5, 2.5),
    "udp_amplify": ([], True, True),
    "reuse_port": ([], True, True),
    "engine": (["asyncio"], "asyncio", "asyncio"),
    "busy_poll_us": (["0"], 0, 0),
    "handler_threads": (["4"], 4, 4),
    "blocking": ([], True, True),
    "nonblocking": ([], True, True),
    "proxy_protocol": ([], True, True),
    "proxy_from": (["127.0.0.1/32"], ["127.0.0.1/32"], (ip_network("127.0.0.1/32"),)),
    "proxy_header_timeout": (["2"], 2, 2.0),
    "service_options": (["quotes=q.txt"], {"quotes": "q.txt"}, {"quotes": "q.txt"}),
    "trace": ([], True, True),
}
#: What a setting needs beside it to be valid (a key needs its certificate).
NEEDS = {"tls_key": {"tls_cert": "c.pem"}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def from_cli(*words: str) -> ServerConfig:
    return build_config(parser().parse_intermixed_args(list(words)))


def test_server_config_fields_are_the_declared_settings() -> None:
    fields = dataclasses.fields(ServerConfig)
    assert [f.name for f in fields] == [s.name for s in SETTINGS]
    defaults = ServerConfig()
    for s in SETTINGS:
        assert getattr(defaults, s.name) == s.default, s.name
    assert ServerConfig().service_options is not ServerConfig().service_options


def test_every_setting_has_a_sample() -> None:
    assert set(SAMPLES) == set(BY_NAME)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_setting_is_a_serve_option_and_a_toml_key(name: str) -> None:
    words, toml_value, expected = SAMPLES[name]
    s = BY_NAME[name]
    assert s.option == "--" + name.replace("_", "-")
    need_words = [w for k, v in NEEDS.get(name, {}).items() for w in (BY_NAME[k].option, v)]
    cfg = from_cli(*need_words, s.option, *words)
    assert getattr(cfg, name) == expected
    assert name in OPTION_KEYS
    (entry,) = parse_config(
        {"service": [{"name": "echo", **NEEDS.get(name, {}), name: toml_value}]}, "f.toml"
    )
    assert getattr(entry.config, name) == expected
    # Not given: the declared default, on both.
    assert getattr(from_cli(*need_words), name) == s.default


def test_old_spellings_and_short_flags_still_work() -> None:
    assert from_cli("--busy-poll", "7").busy_poll_us == 7
    assert from_cli("--quotes", "q").service_options == {"quotes": "q"}
    args = parser().parse_intermixed_args(["-l", "tcp://127.0.0.1:0", "-q"])
    assert args.listen == ["tcp://127.0.0.1:0"] and args.log_level == "warning"
    (entry,) = parse_config({"service": [{"name": "qotd", "options": {"a": 1}}]}, "f.toml")
    assert entry.config.service_options == {"a": 1}


def test_errors_name_the_option_or_key() -> None:
    with pytest.raises(ConfigError, match=r"^--max-message: bad size: "):
        from_cli("--max-message", "lots")
    with pytest.raises(ConfigError, match=r"^--max-conns: expected an integer, got 'x'$"):
        from_cli("--max-conns", "x")
    with pytest.raises(ConfigError, match=r"got 99999 \(option --busy-poll-us\)$"):
        from_cli("--busy-poll", "99999")
    with pytest.raises(ConfigError) as info:
        parse_config({"service": [{"name": "echo", "backlog": 0}]}, "f.toml")
    assert str(info.value) == (
        "f.toml: [[service]] #1 (echo): backlog must be at least 1, got 0 (key 'backlog')"
    )
    with pytest.raises(ConfigError, match=r"keys 'service_options' and 'options' set one option"):
        parse_config({"service": [{"name": "qotd", "options": {}, "service_options": {}}]})
    # Two values that only clash together are not blamed on either.
    with pytest.raises(ConfigError, match=r"high-water mark$"):
        from_cli("--write-high-water", "128K", "--write-low-water", "200K")


def test_scope_and_reload_marks() -> None:
    assert {s.name for s in SERVER_WIDE} == {
        "max_conns",
        "drain_timeout",
        "busy_poll_us",
        "handler_threads",
    }
    assert not_reloadable(["backlog", "engine", "busy_poll_us", "reuse_port", "service"]) == [
        "engine",
        "busy_poll_us",
        "reuse_port",
    ]


def test_the_server_wide_config_combines_the_tables() -> None:
    base = ServerConfig(drain_timeout=3.0, busy_poll_us=20)
    ep = parse_endpoint("tcp://127.0.0.1:0")
    units = [
        Unit(ep, "echo", base.replace(max_conns=5, drain_timeout=1.0)),
        Unit(ep, "echo", base.replace(max_conns=2, busy_poll_us=80)),
        Unit(ep, "echo", base),
    ]
    wide = server_config(AppSpec(config=base), units)
    assert (wide.max_conns, wide.drain_timeout, wide.busy_poll_us) == (2, 3.0, 80)
    assert server_config(AppSpec(), [Unit(ep, "echo", ServerConfig())]).max_conns is None


def test_docs_table_is_the_declaration() -> None:
    text = DOC.read_text()
    m = re.search(r"<!-- settings table:[^\n]*-->\n(.*?)<!-- end of settings table -->", text, re.S)
    assert m, f"{DOC}: no settings table markers"
    assert m.group(1) == settings_table(), (
        f"{DOC} is stale: paste sockserve.settings.settings_table() between its markers"
    )
    for s in SETTINGS:
        assert f"`{s.option}`" in m.group(1)
