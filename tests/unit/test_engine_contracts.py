"""The engine's contracts: close reasons, the server-wide connection budget, and the
rule that the engine never imports the layers above it."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

import pytest

import sockserve._engine
from sockserve._engine.contracts import CloseReason, ConnectionBudget

ENGINE = Path(sockserve._engine.__file__).parent


@pytest.mark.parametrize(
    ("reason", "detail", "text", "kind", "level"),
    [
        (CloseReason.CLOSED, "", "closed", None, logging.INFO),
        (CloseReason.ERROR, "Connection reset by peer", "error: Connection reset by peer", "reset", logging.INFO),
        (CloseReason.PROTOCOL, "line too long", "protocol error: line too long", "protocol", logging.WARNING),
        (CloseReason.PROXY, "none within 3s", "PROXY header: none within 3s", "proxy", logging.INFO),
        (CloseReason.IDLE, "5s", "idle for 5s", "idle_timeout", logging.INFO),
        (CloseReason.DRAIN_TIMEOUT, "", "drain timeout", "drain_timeout", logging.INFO),
        (CloseReason.DENIED, "", "denied", "denied", logging.INFO),
        (CloseReason.DENIED, "by the reloaded allow/deny rules", "denied by the reloaded allow/deny rules", "denied", logging.INFO),
        (CloseReason.HANDLER, "", "handler error", None, logging.INFO),
    ],
)  # fmt: skip
def test_close_reason_words_counts_and_levels_as_the_logs_and_metrics_expect(
    reason: CloseReason, detail: str, text: str, kind: str | None, level: int
) -> None:
    assert (reason.text(detail), reason.kind, reason.level) == (text, kind, level)


class Listener:
    """A runtime as the budget sees it: records each time it is told a slot is free."""

    def __init__(self) -> None:
        self.told = 0

    def below_limit(self) -> None:
        self.told += 1


def test_budget_counts_and_tells_every_listener_when_a_slot_frees() -> None:
    budget = ConnectionBudget(2)
    a, b = Listener(), Listener()
    budget.join(a)
    budget.join(b)
    budget.take()
    assert not budget.at_limit()
    budget.take()
    assert budget.at_limit() and budget.count == 2
    budget.give_back()  # the limit is shared: both hear of the free slot, not only a's
    assert (budget.count, a.told, b.told) == (1, 1, 1)
    budget.leave(b)  # stopped accepting: no longer told
    budget.give_back()
    assert (budget.count, a.told, b.told) == (0, 2, 1)


def test_budget_at_the_limit_tells_no_one_and_no_limit_never_is_at_it() -> None:
    budget = ConnectionBudget(1)
    lst = Listener()
    budget.join(lst)
    budget.take()
    budget.take()  # over the limit (accepted before the limit was lowered)
    budget.give_back()
    assert budget.at_limit() and lst.told == 0
    unlimited = ConnectionBudget(None)
    unlimited.join(lst)
    for _ in range(1000):
        unlimited.take()
    assert not unlimited.at_limit()
    unlimited.give_back()
    assert lst.told == 0  # no limit: nobody was ever paused at one


def test_a_raised_limit_resumes_listeners_paused_at_the_old_one() -> None:
    budget = ConnectionBudget(1)
    lst = Listener()
    budget.join(lst)
    budget.take()
    budget.set_limit(1)
    assert lst.told == 0
    budget.set_limit(2)
    assert lst.told == 1


def test_wait_empty_returns_when_the_last_connection_closes() -> None:
    async def main() -> None:
        budget = ConnectionBudget()
        await asyncio.wait_for(budget.wait_empty(), 1)  # nothing open: at once
        budget.take()
        budget.take()
        waiter = asyncio.ensure_future(budget.wait_empty())
        budget.give_back()
        await asyncio.sleep(0)
        assert not waiter.done()
        budget.give_back()
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (functions, TYPE_CHECKING), resolved."""
    package = ["sockserve", "_engine"]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_the_engine_imports_nothing_above_it() -> None:
    """The layers point down: the engine is embedded by ``server``, run by ``deploy`` and
    ``cli``, so it must not import them back, not even lazily or for type checking."""
    above = ("sockserve.server", "sockserve.deploy", "sockserve.cli")
    modules = sorted(ENGINE.glob("*.py"))
    assert len(modules) > 5, f"no engine modules found in {ENGINE}"
    found = [
        f"{path.name} imports {name}"
        for path in modules
        for name in _imports(path)
        if name.startswith(above)
    ]
    assert not found, found


def test_the_contracts_module_is_a_leaf_of_the_engine() -> None:
    """Every engine module may import contracts; so contracts imports no engine module."""
    engine_imports = [
        n for n in _imports(ENGINE / "contracts.py") if n.startswith("sockserve._engine")
    ]
    assert not engine_imports, engine_imports
