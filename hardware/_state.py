"""An optional base state model for workflows that use the bundled GPIO steps."""

# No `from __future__ import annotations` here: pydantic would have to evaluate each field's
# annotation from its text (compiling it) when the models are built, at every start of the agent.

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class HardwareState(BaseModel):
    """A state model whose ``gpio`` field shows what the steps of :mod:`hardware.steps` switched.

    Not needed for those steps to work: the engine keeps what each step commanded in the journal
    and hands it to the step's compensation. With this model, ``gpio`` also maps a forward step's
    name to what it changed (``device``, ``previous`` value, ``value`` set), for whoever reads the
    state. Unknown fields are rejected, so a step result with a typo fails the step instead of
    vanishing.
    """

    model_config = ConfigDict(extra="forbid")

    # A lambda, not the builtin dict: pydantic inspects a factory's signature, and for a builtin
    # that means tokenizing its text signature (milliseconds at the agent's start-up).
    gpio: dict[str, dict[str, Any]] = Field(default_factory=lambda: {})
