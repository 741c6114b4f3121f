"""Bundled GPIO steps and their compensations, for use from workflow YAML.

Every step is ``async def f(state, context, **params)`` and reaches the board via
``context.hardware``. A compensation takes the same params as its forward step, so one ``params``
block in the YAML serves both. A step that sets an output reports what it commanded (the value
before and the value set) in ``context.outputs``; the engine commits that with the step's result,
in the journal, and hands it to the step's compensation, also after a restart. The workflow's
state model needs no field for it: any pydantic model will do::

    - name: Open_Valve
      function: hardware.steps.set_output
      compensate_function: hardware.steps.restore_output
      params: {device: valve, value: true}

A state model that subclasses :class:`hardware.HardwareState` also gets the record in its
``gpio`` field (a convenience for steps and operators that read the state). A compensation that
finds no record (the forward step was interrupted before its result was saved) drives the device
to its configured ``safe`` value instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hardware._board import Board, BoardDevice
from hardware._config import OUTPUT_KINDS
from hardware._errors import ConfigError, NoBoard, WrongDeviceKind

__all__ = [
    "pulse",
    "read_input",
    "restore_output",
    "restore_pwm",
    "run_for",
    "safe_output",
    "set_output",
    "set_pwm",
    "stop_output",
    "wait_for_input",
]


async def set_output(
    state: Any, context: Any, device: str, value: bool | float
) -> dict[str, Any] | None:
    """Set an output (or pwm) device to ``value``; remembers the previous value for ``restore_output``."""
    dev = _output(context, device)
    previous = dev.value
    dev.set(value)
    context.logger.info("%s: %s -> %s (was %s)", context.step_name, device, dev.value, previous)
    return _remember(state, context, device=device, previous=previous, value=dev.value)


async def restore_output(
    state: Any, context: Any, device: str, value: bool | float | None = None
) -> None:
    """Compensation for ``set_output``: put the device back to the value it had before the step."""
    dev = _output(context, device)
    _restore(state, context, dev)


async def pulse(
    state: Any, context: Any, device: str, seconds: float, value: bool | float = True
) -> dict[str, Any] | None:
    """Set ``device`` to ``value`` for ``seconds``, then back to what it was (also if cancelled)."""
    delay = _seconds(context, seconds)
    dev = _output(context, device)
    previous = dev.value
    dev.set(value)
    try:
        await asyncio.sleep(delay)
    finally:
        dev.set(previous)
    context.logger.info("%s: pulsed %s to %s for %g s", context.step_name, device, value, delay)
    return _remember(state, context, device=device, previous=previous, value=dev.coerce(value))


async def safe_output(
    state: Any,
    context: Any,
    device: str,
    seconds: float | None = None,
    value: bool | float | None = None,
) -> None:
    """Compensation for ``pulse`` (or any step): drive ``device`` to its configured safe value."""
    dev = _output(context, device)
    dev.set(dev.config.safe_value)
    context.logger.info("%s: %s -> safe value %s", context.step_name, device, dev.value)


async def run_for(state: Any, context: Any, device: str, seconds: float) -> dict[str, Any] | None:
    """Switch ``device`` on, wait ``seconds`` (without blocking the loop), switch it off."""
    delay = _seconds(context, seconds)
    dev = _output(context, device)
    previous = dev.value
    dev.on()
    try:
        await asyncio.sleep(delay)
    finally:
        dev.off()
    context.logger.info("%s: ran %s for %g s", context.step_name, device, delay)
    return _remember(state, context, device=device, previous=previous, value=dev.value)


async def stop_output(state: Any, context: Any, device: str, seconds: float | None = None) -> None:
    """Compensation for ``run_for``: switch the device off."""
    dev = _output(context, device)
    dev.off()
    context.logger.info("%s: %s off", context.step_name, device)


async def set_pwm(state: Any, context: Any, device: str, value: float) -> dict[str, Any] | None:
    """Set a pwm device's duty cycle (0.0 to 1.0); remembers the previous one for ``restore_pwm``."""
    dev = _output(context, device, kinds=("pwm",), operation="take a duty cycle")
    previous = dev.value
    dev.set(value)
    context.logger.info("%s: %s duty %s (was %s)", context.step_name, device, dev.value, previous)
    return _remember(state, context, device=device, previous=previous, value=dev.value)


async def restore_pwm(state: Any, context: Any, device: str, value: float | None = None) -> None:
    """Compensation for ``set_pwm``: put the duty cycle back to what it was before the step."""
    dev = _output(context, device, kinds=("pwm",), operation="take a duty cycle")
    _restore(state, context, dev)


# ASYNC109: ``timeout`` is a YAML param of the step, turned into DeviceTimeout naming the device.
async def wait_for_input(
    state: Any,
    context: Any,
    device: str,
    value: bool = True,
    timeout: float | None = None,  # noqa: ASYNC109
    field: str | None = None,
    elapsed_field: str | None = None,
) -> dict[str, Any] | None:
    """Wait until input ``device`` reads ``value``; raises :class:`DeviceTimeout` after ``timeout`` s.

    ``field`` names a state field that receives the value seen, ``elapsed_field`` one that receives
    the seconds waited. ``timeout`` None waits forever (prefer a timeout: the saga compensates on one).
    """
    for name in (field, elapsed_field):
        if name is not None:
            _require_field(state, context, name)
    if timeout is not None:
        timeout = _seconds(context, timeout, what="timeout")
    dev = _board(context)[device]
    started = time.monotonic()
    seen = await dev.wait_for(value, timeout=timeout)
    waited = time.monotonic() - started
    context.logger.info("%s: %s became %s after %.3f s", context.step_name, device, seen, waited)
    result: dict[str, Any] = {}
    if field is not None:
        result[field] = seen
    if elapsed_field is not None:
        result[elapsed_field] = round(waited, 3)
    return result or None


async def read_input(state: Any, context: Any, device: str, field: str) -> dict[str, Any]:
    """Read ``device`` now and store its value in state field ``field``."""
    _require_field(state, context, field)
    return {field: _board(context)[device].value}


# -- helpers ------------------------------------------------------------------------------------


def _board(context: Any) -> Board:
    board = getattr(context, "hardware", None)
    if board is None:
        raise NoBoard(
            f"Step {context.step_name!r} of {context.workflow_type} drives GPIO, but the agent has no "
            "hardware board. Add a hardware section with devices to the agent config (use "
            "`pin_factory: mock` on a desktop)."
        )
    return board  # type: ignore[no-any-return]


def _output(
    context: Any,
    device: str,
    kinds: tuple[str, ...] = OUTPUT_KINDS,
    operation: str = "be set by a step",
) -> BoardDevice:
    dev = _board(context)[device]
    if dev.kind not in kinds:
        raise WrongDeviceKind(device, dev.kind, operation, kinds)
    return dev


def _seconds(context: Any, seconds: Any, what: str = "seconds") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ConfigError(
            f"Step {context.step_name!r}: {what} must be a number of seconds (0 or more), "
            f"not {seconds!r}."
        )
    return float(seconds)


def _require_field(state: Any, context: Any, field: str) -> None:
    fields = getattr(type(state), "model_fields", None)
    if fields is not None and field not in fields:
        raise ConfigError(
            f"Step {context.step_name!r} writes state field {field!r}, but the state model "
            f"{type(state).__name__} has no such field. Add it to the model or fix the step's params."
        )


def _remember(
    state: Any, context: Any, *, device: str, previous: Any, value: Any
) -> dict[str, Any] | None:
    """Report what the step commanded on its context (the engine journals it); also return it
    for the state's ``gpio`` field when the model has one (:class:`hardware.HardwareState`)."""
    outputs = getattr(context, "outputs", None)
    if isinstance(outputs, dict):
        outputs[device] = {"previous": previous, "value": value}
    gpio = getattr(state, "gpio", None)
    if not isinstance(gpio, dict):
        return None
    entry = {"device": device, "previous": previous, "value": value}
    return {"gpio": {**gpio, context.step_name: entry}}


def _record(state: Any, context: Any, dev: BoardDevice) -> dict[str, Any] | None:
    """What the forward step of this compensation commanded on ``dev``: from the journal (handed
    in as ``context.outputs``), else from the state's ``gpio`` field (a workflow begun before
    the journal kept outputs, or a step called by hand), else None."""
    outputs = getattr(context, "outputs", None)
    record = outputs.get(dev.name) if isinstance(outputs, dict) else None
    if isinstance(record, dict) and "previous" in record:
        return record
    gpio = getattr(state, "gpio", None)
    record = gpio.get(context.step_name) if isinstance(gpio, dict) else None
    if isinstance(record, dict) and record.get("device") == dev.name and "previous" in record:
        return record
    return None


def _restore(state: Any, context: Any, dev: BoardDevice) -> None:
    record = _record(state, context, dev)
    if record is not None:
        target = record["previous"]
        source = "its value before the step"
    else:
        # The forward step's result was never saved (interrupted), so we do not know what it
        # replaced: the configured safe value is the only defensible choice.
        target = dev.config.safe_value
        source = "its safe value (no record of the forward step)"
    dev.set(target)
    context.logger.info("%s: %s -> %s, %s", context.step_name, dev.name, dev.value, source)
