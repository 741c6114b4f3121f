"""Async steps that sleep ``delay_min``..``delay_max`` seconds (from the state) and count."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from pydantic import BaseModel

from agent import StepContext


class SlowState(BaseModel):
    delay_min: float = 0.05
    delay_max: float = 0.2
    done: list[str] = []


async def work(state: SlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    await asyncio.sleep(random.uniform(state.delay_min, state.delay_max))
    return {"done": [*state.done, context.step_name]}


async def undo(state: SlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    return {"done": [s for s in state.done if s != context.step_name]}
