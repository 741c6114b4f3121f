"""Base state model for workflows that use the bundled GPIO steps."""

# No `from __future__ import annotations` here: pydantic would have to evaluate each field's
# annotation from its text (compiling it) when the models are built, at every start of the agent.

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class HardwareState(BaseModel):
    """Subclass this for a workflow's state when its steps come from :mod:`hardware.steps`.

    ``gpio`` maps a forward step's name to what that step changed (``device``, ``previous`` value,
    ``value`` set), so its compensation can put the device back after a restart. Unknown fields are
    rejected, so a step result with a typo fails the step instead of vanishing.
    """

    model_config = ConfigDict(extra="forbid")

    # A lambda, not the builtin dict: pydantic inspects a factory's signature, and for a builtin
    # that means tokenizing its text signature (milliseconds at the agent's start-up).
    gpio: dict[str, dict[str, Any]] = Field(default_factory=lambda: {})
