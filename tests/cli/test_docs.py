"""Every code block of README.md and docs/*.md is run or checked, so the docs cannot drift.

How each block is verified, by its fence's language:

- ``python``: run in a fresh interpreter (timeout 60 s) and must exit 0. A block that calls
  ``sockserve.serve(...)`` serves until a signal: it is started, its "listening on" lines
  are awaited, a real request goes to the first endpoint, then SIGTERM, and it must exit 0.
- ``sh``: the blocks of one section run in one bash session (``set -euo pipefail``), in a
  scratch directory, so ``%1`` and ``$!`` refer across blocks as they would in a terminal.
  Readiness waits are inserted, never sleeps: after a ``sockserve serve ... &`` the test
  waits until every endpoint it was given accepts; before a ``sockserve call``/``bench`` or
  ``curl`` until its URL accepts. A ``sockserve serve`` in the foreground (it would serve
  forever) is started, awaited, stopped with SIGTERM, and must exit 0. Every background job
  still running at the end of the section gets SIGTERM and must exit 0.
- ``console``: ``$ `` lines are commands (a ``sockserve serve`` is taken as running in
  another terminal); the lines after each are its output, matched in order, where ``...``
  stands for anything and dates and times match any date and time.
- ``toml``: parsed and loaded by the config reader. ``text``: a ``sockserve ...`` synopsis
  must name only options the command has; other text blocks have an explicit checker.

Run against real servers on loopback: every documented port is mapped to a free one and
every ``/tmp/`` path to the scratch directory (SUBSTITUTIONS says each change and why).
The few lines that cannot run here are in EXEMPT_LINES/EXEMPT_BLOCKS/CHECK_ONLY with a
reason each, and a test fails if an entry no longer matches the docs. A block of any
other kind fails: nothing is skipped silently.

``python tests/cli/test_docs.py ready PID ARGS...`` and ``... url URL`` are the readiness
waits the bash sessions call.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

#: The ports the docs use; each is replaced by a free port (a port not listed here fails the
#: test, so a block never talks to a port this machine may really use).
PORTS = (21567, 21568, 21601, 21602, 9000, 9100, 2007, 19, 8474)

#: Lines that are not run, by a text each contains, and why.
EXEMPT_LINES = {
    "python3 -m venv .venv && .venv/bin/pip install .": "installs from the network into a new "
    "venv; the suite itself runs in the installed checkout",
    "bash .ci/run": "is CI itself: installs Debian packages and runs this very suite",
    "pip install -e '.[bench]'": "installs the benchmark peers (gevent, twisted, matplotlib) "
    "from the network",
}
#: Whole blocks not run, by a text the block contains, and why.
EXEMPT_BLOCKS = {
    "$ scripts/mutation ": "runs mutmut for minutes per module (the [mutation] extra); the "
    "figures in docs/testing.md are from real runs, not part of CI",
    "sudo systemctl enable --now sockserve.socket": "installs unit files system-wide: needs "
    "root and systemd as PID 1 (tests/interop/test_activation.py serves the same sockets, and the next "
    "block runs them with systemd-socket-activate)",
}
#: Commands run with --help instead, and why; every option the line shows must be in the help.
CHECK_ONLY = {
    "benchmarks/run.py": "a benchmark run takes ten minutes of both cores",
}
#: Text replaced in every runnable block, and why (ports and /tmp are handled separately).
SUBSTITUTIONS = {
    "0.0.0.0": ("127.0.0.1", "tests bind loopback only"),
    " -d 10 ": (" -d 1 ", "bench runs of 1 s, not 10-30 s, on a shared machine"),
    " -d 30 ": (" -d 1 ", "bench runs of 1 s, not 10-30 s, on a shared machine"),
    " -n 100000 ": (" -n 2000 ", "2000 requests are enough to check the command"),
    "benchmarks/conn10k.py ": ("benchmarks/conn10k.py -n 200 ", "200 connections, not 10,000"),
}
#: How a background job other than sockserve is stopped gracefully at the end of a section
#: (HAProxy's soft stop is SIGUSR1; on SIGTERM it exits 143 at once).
STOP_SIGNALS = {"haproxy": "USR1"}
#: Sections whose blocks talk to `sockserve serve` on its default endpoints without starting
#: it (the reader has it running, as the README's first example says): the test starts it.
DEFAULT_SERVER_SECTIONS = {
    ("README.md", "Calling"),
    ("README.md", "Benchmarking"),
    ("README.md", "Python API"),
}


@dataclass
class Block:
    path: Path
    section: str
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    lang: str | None = None
    start = 0
    body: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if lang is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                lang, start, body = line[3:].strip(), n, []
        elif line.startswith("```"):
            blocks.append(Block(path, section, start, lang, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"{path}:{start}: unterminated code block"
    return blocks


ALL_BLOCKS = [b for p in DOCS for b in read_blocks(p)]
SECTIONS: dict[tuple[str, str], list[Block]] = {}
for _b in ALL_BLOCKS:
    SECTIONS.setdefault((str(_b.path.relative_to(REPO)), _b.section), []).append(_b)


# -- readiness waits (also run as a script from the bash sessions) -----------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reachable(url: str) -> bool:
    from sockserve.endpoints import parse_endpoint

    ep = parse_endpoint(url)
    if ep.scheme == "unixgram":
        return os.path.exists(ep.path)
    if ep.scheme == "udp":  # nothing to connect to: bound when its port is taken
        fam = socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            try:
                s.bind((ep.host, ep.port))
            except OSError:
                return True
            return False
    fam = socket.AF_UNIX if ep.is_unix else (socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET)
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(ep.address())
        except OSError:
            return False
        return True


def wait_urls(urls: list[str], pid: int | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while not _reachable(url):
            if pid is not None and not _alive(pid):
                raise SystemExit(f"docs test: process {pid} exited before {url} was served")
            if time.monotonic() > deadline:
                raise SystemExit(f"docs test: {url} not served within {timeout:.0f}s")
            time.sleep(0.02)


def serve_urls(argv: list[str]) -> list[str]:
    """The endpoints (and metrics port) ``sockserve serve ARGV`` will serve."""
    import argparse

    from sockserve.cli.serve import add_arguments
    from sockserve.deploy.configfile import load_config_file
    from sockserve.server.binding import DEFAULT_URLS

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_intermixed_args(argv)
    if args.config:
        urls = [ep.url() for e in load_config_file(args.config) for ep in e.endpoints]
    else:
        urls = list(args.listen or DEFAULT_URLS)
    if args.metrics:
        urls.append(f"tcp://{args.metrics}")
    return urls


def _helper_main(argv: list[str]) -> int:
    if argv[0] == "ready":  # ready PID SERVE-ARGS...
        wait_urls(serve_urls(argv[2:]), int(argv[1]))
    elif argv[0] == "url":  # url URL
        wait_urls([argv[1]])
    else:
        raise SystemExit(f"unknown helper command {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))


# -- the tests ---------------------------------------------------------------------------

import pytest  # noqa: E402  (the helper above runs without pytest's import cost)
from support import free_port  # noqa: E402


class Env:
    """Port map, scratch directory and text substitutions for one section."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {p: free_port() for p in PORTS}
        self.sock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ssdoc-{os.getpid()}-{id(self)}"
        self.sock_dir.mkdir()  # short: sun_path holds 107 bytes, tmp_path can be longer
        self.work = tmp / "work"
        self.work.mkdir()
        for entry in REPO.iterdir():
            if entry.name in ("deploy", ".git"):
                continue
            (self.work / entry.name).symlink_to(entry)
        for src in (REPO / "deploy").rglob("*"):  # copied with the same substitutions
            dst = self.work / src.relative_to(REPO)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(self.sub(src.read_text()))

    def sub(self, text: str) -> str:
        for old, (new, _) in SUBSTITUTIONS.items():
            text = text.replace(old, new)
        text = text.replace("/tmp/", f"{self.sock_dir}/")
        return _HOSTPORT.sub(
            lambda m: f"{m.group(1)}:{self.ports.get(int(m.group(2)), m.group(2))}", text
        )

    def cleanup(self) -> None:
        for p in self.sock_dir.iterdir():
            p.unlink()
        self.sock_dir.rmdir()


#: HOST:PORT where HOST is an IPv4 address, a bracketed IPv6 one, ``*`` or localhost.
_HOSTPORT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:.]*\]|\*|localhost):(\d{1,5})(?!\d)")


def _ports_in(text: str) -> set[int]:
    return {int(m.group(2)) for m in _HOSTPORT.finditer(text)} - {0}


def _run_env(env: Env) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(env.tmp),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.cleanup()


def _exempt_line(line: str) -> str | None:
    return next((why for key, why in EXEMPT_LINES.items() if key in line), None)


def _exempt_block(block: Block) -> str | None:
    return next((why for key, why in EXEMPT_BLOCKS.items() if key in block.text), None)


# -- sh / console -> one bash script per section ------------------------------------------

PRELUDE = r"""
set -euo pipefail
__jobs=()
__ready() { "$DOCS_PY" "$DOCS_HELPER" ready "$@"; }
__url() { "$DOCS_PY" "$DOCS_HELPER" url "$1"; }
__cleanup() {
    local rc=$? job pid status failed=0
    for job in "${__jobs[@]}"; do kill "-${job#*:}" "${job%%:*}" 2>/dev/null || true; done
    for job in "${__jobs[@]}"; do
        pid=${job%%:*}
        for _ in $(seq 1 1000); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$pid" 2>/dev/null || true
        status=0; wait "$pid" 2>/dev/null || status=$?
        if [ "$status" -ne 0 ]; then echo "docs test: job $pid exited $status" >&2; failed=1; fi
    done
    for pid in "${__console[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 1000); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -eq 0 ] && [ "$failed" -ne 0 ]; then exit 1; fi
}
__console=()
trap __cleanup EXIT
"""

_SERVE = re.compile(r"^(?:\.venv/bin/)?sockserve serve\b")
_CLIENT = re.compile(r"^(?:\.venv/bin/)?sockserve (?:call|bench|chat) (\S+)")
_CURL = re.compile(r"\bcurl\b.*?https?://([\w.\[\]:]+)/")


def _words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _serve_args(words: list[str], env: Env) -> list[str]:
    args = words[2:]
    if not any(a in ("-l", "--listen", "--config") or a.startswith("--listen=") for a in args):
        port = env.ports[21567]  # the default endpoints, on the mapped port
        args += ["--listen", f"tcp://127.0.0.1:{port}", "--listen", f"udp://127.0.0.1:{port}"]
    return args


def _waits(line: str) -> list[str]:
    out = []
    m = _CLIENT.match(line)
    if m:
        out.append(f"__url {shlex.quote(m.group(1))}")
    m = _CURL.search(line)
    if m:
        out.append(f"__url tcp://{m.group(1)}")
    return out


def sh_script(block: Block, env: Env) -> tuple[list[str], list[str]]:
    """(bash lines, what was exempted and why) for one sh block."""
    out: list[str] = [f"# --- {block.where}"]
    notes: list[str] = []
    heredoc: str | None = None
    for raw in env.sub(block.text).splitlines():
        if heredoc is not None:
            out.append(raw)
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.strip()
        m = re.search(r"<<-?\s*'?(\w+)'?", line)
        if m:
            heredoc = m.group(1)
        if not line or line.startswith("#"):
            continue
        why = _exempt_line(line)
        if why:
            notes.append(f"{block.where}: not run: {line!r}: {why}")
            continue
        check = next((k for k in CHECK_ONLY if k in line), None)
        if check:
            script = _words(line)
            opts = [w for w in script if w.startswith("--")]
            out.append(f"__help=$({shlex.join(script[:2])} --help)")
            out.extend(f'grep -q -- {shlex.quote(o)} <<<"$__help"' for o in opts)
            notes.append(f"{block.where}: checked with --help: {line!r}: {CHECK_ONLY[check]}")
            continue
        words = _words(line)
        background = bool(words) and words[-1] == "&"
        if _SERVE.match(line):
            args = _serve_args(words[:-1] if background else words, env)
            cmd = shlex.join(["sockserve", "serve", *args])
            if background:
                out += [f"{cmd} &", '__jobs+=("$!:TERM")', f"__ready $! {shlex.join(args)}"]
            else:  # it would serve forever: serve, stop, exit 0; in a subshell, so no job %N
                out += [
                    "(",
                    f"  {cmd} &",
                    "  __p=$!",
                    "  trap 'kill -KILL $__p 2>/dev/null || true' EXIT",
                    f"  __ready $__p {shlex.join(args)}",
                    "  kill -TERM $__p",
                    "  wait $__p",
                    ")",
                ]
            continue
        out += _waits(line)
        out.append(raw)
        if background:
            out.append(f'__jobs+=("$!:{STOP_SIGNALS.get(words[0], "TERM")}")')
    return out, notes


@dataclass
class ConsoleCommand:
    where: str
    command: str
    expected: list[str]
    out_file: Path


def console_script(block: Block, env: Env, n: int) -> tuple[list[str], list[ConsoleCommand]]:
    out: list[str] = [f"# --- {block.where}"]
    cmds: list[ConsoleCommand] = []
    for raw in env.sub(block.text).splitlines():
        if raw.startswith("$ "):
            cmds.append(
                ConsoleCommand(block.where, raw[2:], [], env.tmp / f"console-{n}-{len(cmds)}.out")
            )
        elif raw.strip():
            assert cmds, f"{block.where}: output before the first '$ ' command"
            cmds[-1].expected.append(raw)
    for c in cmds:
        words = _words(c.command)
        dest = shlex.quote(str(c.out_file))
        if _SERVE.match(c.command):  # as in another terminal: keeps running
            args = _serve_args(words, env)
            cmd = shlex.join(["sockserve", "serve", *args])
            out += [
                f"{cmd} >{dest} 2>&1 &",
                "__console+=($!)",
                f"__ready $! {shlex.join(args)} || true",
            ]
        else:
            out += _waits(c.command)
            out.append(f"{{ {c.command} ; }} >{dest} 2>&1 || true")
    return out, cmds


def _pattern(expected: str) -> re.Pattern[str]:
    p = re.escape(expected.rstrip())
    p = re.sub(
        r"\d{4}\\-\d\d\\-\d\d\\ \d\d:\d\d:\d\d", r"\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d", p
    )
    p = re.sub(
        r"[A-Z][a-z]{2}\\ [A-Z][a-z]{2}\\ \d\d\\ \d\d:\d\d:\d\d\\ \d{4}",
        r"\\w{3} \\w{3} [ \\d]\\d \\d\\d:\\d\\d:\\d\\d \\d{4}",
        p,
    )
    return re.compile(p.replace(re.escape("..."), ".*"))


def check_console(c: ConsoleCommand) -> None:
    actual = c.out_file.read_text().splitlines() if c.out_file.exists() else []
    i = 0
    for exp in c.expected:
        if exp.strip() == "...":
            continue
        pat = _pattern(exp)
        while i < len(actual) and not pat.fullmatch(actual[i].rstrip()):
            i += 1
        assert i < len(actual), (
            f"{c.where}: `{c.command}` did not print (in order) {exp!r}; it printed:\n"
            + "\n".join(actual)
        )
        i += 1


# -- python ------------------------------------------------------------------------------


def run_python(block: Block, env: Env) -> None:
    code = env.sub(block.text)
    script = env.tmp / f"block{block.line}.py"
    script.write_text(code)
    run_env = _run_env(env)
    if "sockserve.serve(" not in code:
        r = subprocess.run(
            [sys.executable, str(script)],
            cwd=env.work,
            env=run_env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, f"{block.where}: exit {r.returncode}\n{r.stdout!r}\n{r.stderr!r}"
        return
    # It serves until a signal: await its endpoint, send a real request, stop it.
    import sockserve

    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=env.work,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = b""
        deadline = time.monotonic() + 30
        while b"listening on " not in line:
            assert time.monotonic() < deadline, f"{block.where}: no 'listening on' line"
            line = proc.stderr.readline()
            assert line, f"{block.where}: exited {proc.wait(5)} before serving"
        m = re.search(r"listening on (\S+) \([^,]+, (\w+)\)", line.decode())
        assert m, line
        framing = m.group(2) if m.group(2) in ("raw", "line", "length") else "raw"
        with sockserve.connect(m.group(1), framing=framing, timeout=5) as c:
            assert c.request(b"hello"), f"{block.where}: empty reply"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, f"{block.where}: exit {proc.returncode}\n{err.decode()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- text / toml -------------------------------------------------------------------------


def check_text(block: Block) -> None:
    first = block.text.split()[0] if block.text.split() else ""
    if first == "sockserve":
        for line in block.text.splitlines():
            words = line.split()
            if words[:1] == ["sockserve"]:
                command = words[1]
            opts = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line))
            helptext = subprocess.run(
                [sys.executable, "-m", "sockserve", command, "--help"],
                capture_output=True,
                timeout=30,
                check=True,
            ).stdout.decode()
            missing = [o for o in opts if not re.search(rf"(?<![\w-]){re.escape(o)}\b", helptext)]
            assert not missing, f"{block.where}: `sockserve {command}` has no {missing}"
        return
    if "bytes_per_conn" in block.text:  # benchmarks/conn10k.py's report: run it small
        r = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "conn10k.py"), "-n", "200"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        shown = {line.split(":")[0].strip() for line in block.text.splitlines() if ":" in line}
        printed = {line.split(":")[0].strip() for line in r.stdout.decode().splitlines()}
        assert shown <= printed, f"{block.where}: conn10k.py no longer prints {shown - printed}"
        return
    if "_engine/" in block.text:  # docs/architecture.md's request path: every module named exists
        named = set(re.findall(r"(?<![\w./])((?:\w+/)+\w+\.(?:py|c)|\w+/(?=\s))", block.text))
        package = REPO / "src" / "sockserve"
        missing = sorted(n for n in named if not (package / n).exists())
        assert named and not missing, f"{block.where}: no such module in src/sockserve: {missing}"
        return
    raise AssertionError(f"{block.where}: a text block with no check; add one to test_docs.py")


def check_toml(block: Block) -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the backport, a dependency on 3.10 only: not installed for mypy on 3.11+
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    from sockserve.deploy.configfile import parse_config

    parse_config(tomllib.loads(block.text), block.where)


# -- one test per section -----------------------------------------------------------------

RUNNABLE = {"python", "sh", "console", "toml", "text"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("doc", "section"), sorted(SECTIONS), ids=lambda v: v)
def test_section(doc: str, section: str, env: Env) -> None:
    blocks = SECTIONS[(doc, section)]
    for b in blocks:
        assert b.lang in RUNNABLE, f"{b.where}: code block of unknown kind {b.lang!r}"
        unknown = _ports_in(b.text) - set(PORTS) if b.lang in ("sh", "console", "python") else ()
        assert not unknown, f"{b.where}: ports {unknown} are not in test_docs.PORTS"
    default = None
    if (doc, section) in DEFAULT_SERVER_SECTIONS:
        port = env.ports[21567]
        default_urls = ["-l", f"tcp://127.0.0.1:{port}", "-l", f"udp://127.0.0.1:{port}"]
        default = subprocess.Popen(
            [str(BIN / "python"), "-m", "sockserve", "serve", "-q", *default_urls],
            stderr=subprocess.DEVNULL,
        )
        wait_urls([f"tcp://127.0.0.1:{port}", f"udp://127.0.0.1:{port}"], default.pid)
    try:
        bash: list[str] = []
        consoles: list[ConsoleCommand] = []
        for n, b in enumerate(blocks):
            why = _exempt_block(b)
            if why:
                print(f"{b.where}: block not run: {why}")
                continue
            if b.lang == "python":
                run_python(b, env)
            elif b.lang == "toml":
                check_toml(b)
            elif b.lang == "text":
                check_text(b)
            elif b.lang == "sh":
                lines, notes = sh_script(b, env)
                bash += lines
                for note in notes:  # shown with -rP / -s: what was not run, and why
                    print(note)
            else:
                lines, cmds = console_script(b, env, n)
                bash += lines
                consoles += cmds
        if bash:
            script = env.tmp / "section.sh"
            script.write_text(PRELUDE + "\n".join(bash) + "\n")
            proc = subprocess.Popen(
                ["bash", str(script)],
                cwd=env.work,
                env={
                    **_run_env(env),
                    "DOCS_PY": sys.executable,
                    "DOCS_HELPER": str(Path(__file__).resolve()),
                },
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                out, _ = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: the script's jobs
                out, _ = proc.communicate(timeout=10)
                raise AssertionError(f"{doc} / {section}: timed out\n{out.decode()}") from None
            assert proc.returncode == 0, (
                f"{doc} / {section}: bash exited {proc.returncode}\n{out.decode()}\n"
                f"--- script:\n{script.read_text()}"
            )
            for c in consoles:
                check_console(c)
    finally:
        if default is not None:
            default.terminate()
            default.wait(20)


def test_exemptions_still_match() -> None:
    """An exemption that matches nothing is stale: remove it (the list stays small)."""
    text = "\n".join(b.text for b in ALL_BLOCKS)
    for key in (*EXEMPT_LINES, *EXEMPT_BLOCKS, *CHECK_ONLY):
        assert key in text, f"exemption {key!r} matches no code block"
    for key in SUBSTITUTIONS:
        assert key in text, f"substitution {key!r} matches no code block"
    assert len(EXEMPT_LINES) + len(EXEMPT_BLOCKS) + len(CHECK_ONLY) <= 6


def test_every_block_has_a_kind() -> None:
    assert ALL_BLOCKS, "no code blocks found"
    for b in ALL_BLOCKS:
        assert b.lang in RUNNABLE, f"{b.where}: code block of unknown kind {b.lang!r}"


def test_readme_lists_every_serve_option() -> None:
    import argparse

    from sockserve.cli.serve import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    readme = (REPO / "README.md").read_text()
    for action in p._actions:
        for opt in action.option_strings:
            assert f"`{opt}" in readme or f" {opt}`" in readme or f"`{opt}`" in readme, (
                f"README.md does not document `sockserve serve {opt}`"
            )
