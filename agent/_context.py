"""What a step function receives besides the state."""

from __future__ import annotations

import logging
from dataclasses import FrozenInstanceError
from typing import Any


class _Frozen:
    """Base of the agent's small immutable records: a frozen, slotted dataclass written out.

    ``@dataclass(frozen=True, slots=True)`` generates its methods with ``exec`` when the class is
    defined, which made the record classes a noticeable share of ``edgesaga run``'s start-up. A
    subclass names its fields in ``__match_args__`` and ``__slots__`` and sets them in ``__init__``
    with ``object.__setattr__``; equality, hash, repr, copy and pickle follow those fields, and
    assigning or deleting one raises :class:`dataclasses.FrozenInstanceError`, as with the
    dataclass.
    """

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def _init(self, *values: Any) -> None:
        """Set the fields, in ``__match_args__`` order (for ``__init__``)."""
        for name, value in zip(self.__match_args__, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Frozen) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __getstate__(self) -> tuple[Any, ...]:
        return self._values()

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._init(*state)


class StepContext(_Frozen):
    """Passed to every step and compensation as its second argument.

    ``idempotency_key`` is stable across retries and restarts: ``<workflow_id>:<step_name>`` for the
    forward step and ``<workflow_id>:<step_name>:compensate`` for its compensation. ``hardware`` is the
    HAL board (:class:`hardware.Board`) or None when the agent runs without one.

    ``outputs`` is where a forward step reports the output values it commanded (a JSON-able dict,
    by device, as ``hardware.steps`` writes it); the engine commits it with the step's result, in
    the journal. A compensation finds there what its forward step's completed attempt reported
    (empty when there is no such record: the forward step never completed, or reported nothing).
    """

    __match_args__ = (
        "workflow_id",
        "workflow_type",
        "step_name",
        "attempt",
        "idempotency_key",
        "params",
        "hardware",
        "compensating",
        "logger",
        "outputs",
    )
    __slots__ = __match_args__

    workflow_id: str
    workflow_type: str
    step_name: str
    attempt: int
    idempotency_key: str
    params: dict[str, Any]
    hardware: Any
    compensating: bool
    logger: logging.Logger
    outputs: dict[str, Any]

    def __init__(
        self,
        workflow_id: str,
        workflow_type: str,
        step_name: str,
        attempt: int,
        idempotency_key: str,
        params: dict[str, Any] | None = None,
        hardware: Any = None,
        compensating: bool = False,
        logger: logging.Logger | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        # Field by field, not through _init: a context is built for every step.
        init = object.__setattr__
        init(self, "workflow_id", workflow_id)
        init(self, "workflow_type", workflow_type)
        init(self, "step_name", step_name)
        init(self, "attempt", attempt)
        init(self, "idempotency_key", idempotency_key)
        init(self, "params", {} if params is None else params)
        init(self, "hardware", hardware)
        init(self, "compensating", compensating)
        init(self, "logger", logging.getLogger("edgesaga.step") if logger is None else logger)
        init(self, "outputs", {} if outputs is None else outputs)
