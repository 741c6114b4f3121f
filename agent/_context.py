"""What a step function receives besides the state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class StepContext:
    """Passed to every step and compensation as its second argument.

    ``idempotency_key`` is stable across retries and restarts: ``<workflow_id>:<step_name>`` for the
    forward step and ``<workflow_id>:<step_name>:compensate`` for its compensation. ``hardware`` is the
    HAL board (:class:`hardware.Board`) or None when the agent runs without one.
    """

    workflow_id: str
    workflow_type: str
    step_name: str
    attempt: int
    idempotency_key: str
    params: dict[str, Any] = field(default_factory=dict)
    hardware: Any = None
    compensating: bool = False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("edgesaga.step"))
