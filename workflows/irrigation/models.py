"""State model of the Irrigation workflow."""

from __future__ import annotations

from hardware import HardwareState


class IrrigationState(HardwareState):
    """What an irrigation run knows; ``gpio`` (from HardwareState) records what each step switched."""

    zone: str = "A"
    level_reached: bool = False
    fill_seconds: float | None = None
