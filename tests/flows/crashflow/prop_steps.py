"""Steps of the generated workflows of tests/test_flow_properties.py.

They keep their record in memory, in :data:`LEDGER` (reset per example): ``("run", step)`` when a
forward step starts, ``("done", step)`` when it completes, ``("fail", step)`` when it raises,
``("undo", step)`` when a compensation completes, ``("decide", step)`` for a DECISION. A step
raises while :data:`FAILS` still counts failures for it; a DECISION returns :data:`ROUTES`' key.
After a simulated crash (:data:`WORLD` ``dead``) nothing is recorded: that process is gone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent import StepContext

LEDGER: list[tuple[str, str]] = []
FAILS: dict[str, int] = {}  # step -> failures still to raise
ROUTES: dict[str, str | None] = {}  # DECISION step -> the key it returns
WORLD: dict[str, bool] = {"dead": False}


def reset(fails: dict[str, int], routes: dict[str, str | None]) -> None:
    LEDGER.clear()
    FAILS.clear()
    FAILS.update(fails)
    ROUTES.clear()
    ROUTES.update(routes)
    WORLD["dead"] = False


def _record(what: str, step: str) -> bool:
    if WORLD["dead"]:
        return False
    LEDGER.append((what, step))
    return True


async def step(state: Any, context: StepContext) -> None:
    name = context.step_name
    if not _record("run", name):
        return
    await asyncio.sleep(0)  # a point where the other branches run, and a cancel lands
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
