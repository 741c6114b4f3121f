"""Steps for the hardware integration tests."""

import asyncio
import os
from pathlib import Path


async def hold(
    state, context, seconds: float, first_seconds: float | None = None, mark: str | None = None
):
    """Sleep; ``first_seconds`` on the first execution only (so a restart finishes fast). Touches
    ``mark`` when it starts, so a test knows the pump is on and the step is running."""
    if mark:
        Path(mark).write_text(f"{os.getpid()} attempt {context.attempt}\n")  # noqa: ASYNC240 - a tiny marker file for the test
    await asyncio.sleep(
        first_seconds if (first_seconds is not None and context.attempt == 1) else seconds
    )
