"""State model of the engine test workflows."""

from __future__ import annotations

from pydantic import BaseModel


class EngineState(BaseModel):
    """What the engine test steps read and write."""

    log: list[str] = []
    count: int = 0
    note: str | None = None
    thread_id: int | None = None
    keys: list[str] = []
    flag_file: str | None = None
    db: str | None = None  # the SQLite file, for steps that look at what is committed
    seen: list[list[str]] = []


class NotAModel:
    """A class that is not a pydantic model (for the definition tests)."""
