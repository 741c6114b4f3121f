"""One error tree for the hardware layer, rooted at :class:`HardwareError`."""

from __future__ import annotations

from collections.abc import Iterable


def with_article(word: str) -> str:
    """``"an input"``, ``"a pwm"``: for messages that name a device kind."""
    return f"an {word}" if word[:1] in tuple("aeiou") else f"a {word}"


class HardwareError(Exception):
    """Root of every error the hardware layer raises on purpose."""


class ConfigError(HardwareError, ValueError):
    """Raised when a hardware config, a GPIO step's params or its state model are invalid."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = problems if problems is not None else [message]
        super().__init__(message)


class UnknownDevice(HardwareError, KeyError):
    """Raised when a device name is not on the board."""

    def __init__(self, device: str, known: Iterable[str]) -> None:
        self.device = device
        self.known = sorted(known)
        super().__init__(device)

    def __str__(self) -> str:
        known = ", ".join(repr(name) for name in self.known) or "none"
        return (
            f"No device named {self.device!r} on this board. Known devices: {known}. "
            "Add it to the hardware devices config or fix the name."
        )


class WrongDeviceKind(HardwareError, TypeError):
    """Raised when an operation does not apply to a device's kind (setting an input, waiting on an output)."""

    def __init__(self, device: str, kind: str, operation: str, allowed: Iterable[str]) -> None:
        self.device = device
        self.kind = kind
        self.operation = operation
        allowed_kinds = " or ".join(allowed)
        super().__init__(
            f"Device {device!r} is {with_article(kind)} device, so it cannot {operation}; "
            f"only {allowed_kinds} devices can."
        )


class InvalidValue(HardwareError, ValueError):
    """Raised when a value does not fit a device (a float for a digital output, a duty cycle outside 0..1)."""


class DeviceUnavailable(HardwareError, RuntimeError):
    """Raised when gpiozero cannot open a configured device (pin in use, pin missing on this board)."""


class DeviceTimeout(HardwareError, TimeoutError):
    """Raised when an input does not reach the awaited value within the timeout."""

    def __init__(self, device: str, value: bool, timeout: float) -> None:
        self.device = device
        self.value = value
        self.timeout = timeout
        super().__init__(
            f"Device {device!r} did not become {value} within {timeout:g} s; "
            "check the wiring and the sensor, or raise the timeout."
        )


class NoPinFactory(HardwareError, RuntimeError):
    """Raised when no gpiozero pin factory can be loaded (no GPIO on this machine, missing driver)."""


class MockPinsRequired(HardwareError, RuntimeError):
    """Raised when an input is driven by software (``set_input``, ``simulate``) on real pins."""


class BoardClosed(HardwareError, RuntimeError):
    """Raised when a device is used after its board was closed."""


class WrongEventLoop(HardwareError, RuntimeError):
    """Raised when a board bound to one running event loop is awaited from another."""


class NoBoard(HardwareError, RuntimeError):
    """Raised when a GPIO step runs but the agent has no hardware board (``context.hardware`` is None)."""
