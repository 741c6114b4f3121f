"""State model of the fail-safe test workflows."""

from hardware import HardwareState


class FailSafeState(HardwareState):
    """``mark``: a file a step writes when it starts; ``release``: a file a step waits for;
    ``note``: what a step returns to make its commit large."""

    zone: str = "A"
    level_reached: bool = False
    fill_seconds: float | None = None
    mark: str | None = None
    release: str | None = None
    note: str | None = None
