"""No-op steps with the payment saga's shape, for benchmarks: the engine's cost, not the steps'."""

from pydantic import BaseModel


class NoopState(BaseModel):
    order_id: str = "ORD-1"
    amount: float = 1.0
    n: int = 0


async def step(state: NoopState, context, **params) -> dict:
    return {"n": state.n + 1}


async def undo(state: NoopState, context, **params) -> dict:
    return {"n": state.n - 1}


def sync_step(state: NoopState, context, **params) -> dict:
    return {"n": state.n + 1}


def sync_undo(state: NoopState, context, **params) -> dict:
    return {"n": state.n - 1}
