"""Steps of the generated workflows of tests/test_flow_properties.py.

They keep their record in memory, in :data:`LEDGER` (reset per example): ``("run", step)`` when a
forward step starts, ``("done", step)`` when it completes, ``("fail", step)`` when it raises,
``("undo", step)`` when a compensation completes, ``("decide", step)`` for a DECISION. A step
raises while :data:`FAILS` still counts failures for it, after :data:`YIELDS` awaits; a DECISION returns :data:`ROUTES`' key.
After a simulated crash (:data:`WORLD` ``dead``) nothing is recorded: that process is gone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent import StepContext

LEDGER: list[tuple[str, str]] = []
FAILS: dict[str, int] = {}  # step -> failures still to raise
#: FAILS as of the last commit: a failure the dead process did not commit is raised again
#: (the run that raised it never happened, as far as the workflow can know).
FAILS_COMMITTED: dict[str, int] = {}
ROUTES: dict[str, str | None] = {}  # DECISION step -> the key it returns
YIELDS: dict[str, int] = {}  # step -> awaits it makes before it ends (default 1; SLOW: a sleep)
SLOW = -1  # the step sleeps SLOW_SECONDS: a sibling branch's failure stops it before it ends
SLOW_SECONDS = 0.05
WORLD: dict[str, bool] = {"dead": False}


def reset(fails: dict[str, int], routes: dict[str, str | None], yields: dict[str, int]) -> None:
    LEDGER.clear()
    YIELDS.clear()
    YIELDS.update(yields)
    FAILS.clear()
    FAILS.update(fails)
    FAILS_COMMITTED.clear()
    FAILS_COMMITTED.update(fails)
    ROUTES.clear()
    ROUTES.update(routes)
    WORLD["dead"] = False


def crashed() -> None:
    """The process died: nothing more is recorded, and uncommitted failures are undone."""
    WORLD["dead"] = True
    FAILS.clear()
    FAILS.update(FAILS_COMMITTED)


def _record(what: str, step: str) -> bool:
    if WORLD["dead"]:
        return False
    LEDGER.append((what, step))
    return True


async def step(state: Any, context: StepContext) -> None:
    name = context.step_name
    if not _record("run", name):
        return
    yields = YIELDS.get(name, 1)
    if yields == SLOW:
        await asyncio.sleep(SLOW_SECONDS)
    for _ in range(yields):
        await asyncio.sleep(0)  # where the other branches run, and a cancel lands
    if WORLD["dead"]:
        return
    if FAILS.get(name, 0) > 0:
        FAILS[name] -= 1
        _record("fail", name)
        raise RuntimeError(f"{name} fails on purpose")
    _record("done", name)


async def undo(state: Any, context: StepContext) -> None:
    await asyncio.sleep(0)
    _record("undo", context.step_name)


async def decide(state: Any, context: StepContext) -> str | None:
    _record("decide", context.step_name)
    return ROUTES.get(context.step_name)
