"""Base state model for workflows that use the bundled GPIO steps."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class HardwareState(BaseModel):
    """Subclass this for a workflow's state when its steps come from :mod:`hardware.steps`.

    ``gpio`` maps a forward step's name to what that step changed (``device``, ``previous`` value,
    ``value`` set), so its compensation can put the device back after a restart. Unknown fields are
    rejected, so a step result with a typo fails the step instead of vanishing.
    """

    model_config = ConfigDict(extra="forbid")

    gpio: dict[str, dict[str, Any]] = Field(default_factory=dict)
