"""Steps of the irrigation examples that are not bundled GPIO steps (``hardware.steps``)."""

from __future__ import annotations

from typing import Any

from hardware import NoBoard


async def soil_route(state: Any, context: Any) -> str:
    """DECISION of ``SoilIrrigation``: ``"dry"`` when the ``soil`` sensor reads true, else ``"wet"``."""
    board = context.hardware
    if board is None:
        raise NoBoard(
            f"Step {context.step_name!r} reads the soil sensor, but the agent has no hardware "
            "board; add a hardware section with a 'soil' input (see workflows/irrigation/garden.yaml)."
        )
    dry = bool(board["soil"].value)
    context.logger.info("%s: the soil is %s", context.step_name, "dry" if dry else "wet")
    return "dry" if dry else "wet"
