"""Pydantic models for the hardware config: devices, pin factory and desktop simulation."""

# No `from __future__ import annotations` here: pydantic would have to evaluate each field's
# annotation from its text (compiling it) when the models are built, at every start of the agent.

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hardware._errors import ConfigError, with_article
from hardware._yaml import YamlRefused, read_yaml_text, safe_load_yaml, yaml_problem

DeviceKind = Literal["output", "input", "button", "pwm"]
KINDS: tuple[str, ...] = ("output", "input", "button", "pwm")
OUTPUT_KINDS: tuple[str, ...] = ("output", "pwm")
INPUT_KINDS: tuple[str, ...] = ("input", "button")
MAX_BCM_PIN = 27

# Which optional keys each kind accepts (``kind`` and ``pin`` are always required).
_KEYS_FOR_KIND: dict[str, frozenset[str]] = {
    "output": frozenset({"active_high", "initial", "safe", "description"}),
    "pwm": frozenset({"active_high", "initial", "safe", "frequency", "description"}),
    "input": frozenset({"active_high", "pull_up", "bounce_time", "description"}),
    "button": frozenset({"active_high", "pull_up", "bounce_time", "description"}),
}


class DeviceConfig(BaseModel):
    """One device on the board: what it is (``kind``), where (BCM ``pin``) and how it behaves.

    ``initial`` is the value set when the board opens and ``safe`` the value :meth:`Board.safe_state`
    drives (both off unless given): ``true``/``false`` for an output, 0.0 to 1.0 for a pwm device.
    ``pull_up`` defaults to gpiozero's choice (false for an input, true for a button); ``null`` means
    floating (fit an external resistor). ``active_high`` defaults to true for outputs; for a pulled
    input it follows the pull (a pulled-up input is active when the pin reads low).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DeviceKind = Field(description="output, pwm, input or button.")
    pin: int = Field(description="BCM GPIO number 0 to 27.")
    active_high: bool | None = Field(None, description="Whether on (true) is the pin high.")
    pull_up: bool | None = Field(None, description="Internal pull resistor; null: floating.")
    bounce_time: float | None = Field(None, description="Debounce time in seconds.")
    # int is listed so that a YAML ``1`` is reported as written rather than as ``1.0``.
    initial: bool | int | float | None = Field(
        None, description="Value when a Board opens it outside the agent."
    )
    safe: bool | int | float | None = Field(
        None,
        description=(
            "Value at start-up, shutdown and when a workflow holding it fails or is cancelled."
        ),
    )
    frequency: float | None = Field(None, description="PWM frequency in hertz.")
    description: str = Field("", description="Free text.")

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        if value not in KINDS:
            raise ValueError(f"unknown kind {value!r}; use one of {', '.join(KINDS)}")
        return value

    @field_validator("pin", mode="before")
    @classmethod
    def _bcm_pin(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"pin must be a BCM GPIO number (an integer from 0 to {MAX_BCM_PIN}), not {value!r}"
            )
        if not 0 <= value <= MAX_BCM_PIN:
            raise ValueError(
                f"BCM pin {value} is out of range; use a GPIO number from 0 to {MAX_BCM_PIN} "
                "(BCM numbering, not the physical header pin number)"
            )
        return value

    @field_validator("bounce_time", "frequency")
    @classmethod
    def _positive(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and value <= 0:
            unit = "seconds" if info.field_name == "bounce_time" else "hertz"
            raise ValueError(
                f"{info.field_name} must be a positive number of {unit}, not {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Self:
        allowed = _KEYS_FOR_KIND[self.kind]
        for key in sorted(self.model_fields_set - {"kind", "pin"} - allowed):
            owners = [kind for kind, keys in _KEYS_FOR_KIND.items() if key in keys]
            raise ValueError(
                f"{key!r} does not apply to {with_article(self.kind)} device; it is only for "
                f"{' and '.join(owners)} devices"
            )
        for key in ("initial", "safe"):
            raw = getattr(self, key)
            if raw is None:
                continue
            if self.kind == "output" and not isinstance(raw, bool):
                raise ValueError(f"{key} must be true or false for an output device, not {raw!r}")
            if self.kind == "pwm" and not 0.0 <= float(raw) <= 1.0:
                raise ValueError(f"{key} must be between 0.0 and 1.0 for a pwm device, not {raw!r}")
        if self.kind in INPUT_KINDS:
            pull = self.effective_pull_up
            if pull is not None and self.active_high is not None and self.active_high == pull:
                given = "pull_up" in self.model_fields_set
                pull_text = f"pull_up: {str(pull).lower()}" + (
                    "" if given else f" (the {self.kind} default)"
                )
                direction, level = ("up", "low") if pull else ("down", "high")
                raise ValueError(
                    f"active_high: {str(self.active_high).lower()} contradicts {pull_text}; a "
                    f"pulled-{direction} input is active when its pin reads {level}. Remove "
                    "active_high, or set pull_up: null and fit an external resistor"
                )
        return self

    @property
    def is_output(self) -> bool:
        """True for kinds the board drives (output, pwm)."""
        return self.kind in OUTPUT_KINDS

    @property
    def effective_pull_up(self) -> bool | None:
        """The pull actually used: as configured, else gpiozero's default for the kind."""
        if "pull_up" in self.model_fields_set:
            return self.pull_up
        return self.kind == "button"

    @property
    def effective_active_high(self) -> bool:
        """True when the device is active (value true) while its pin is high."""
        if self.kind in INPUT_KINDS and self.effective_pull_up is not None:
            return not self.effective_pull_up
        return True if self.active_high is None else self.active_high

    @property
    def initial_value(self) -> bool | float:
        """The value set when the board opens (off unless configured)."""
        return self._typed(self.initial)

    @property
    def safe_value(self) -> bool | float:
        """The value :meth:`Board.safe_state` drives (off unless configured)."""
        return self._typed(self.safe)

    @property
    def pwm_frequency(self) -> float:
        """PWM frequency in hertz (100 unless configured)."""
        return 100.0 if self.frequency is None else self.frequency

    def _typed(self, raw: bool | int | float | None) -> bool | float:
        if self.kind == "pwm":
            return float(raw or 0.0)
        return bool(raw)


class SimulatedChange(BaseModel):
    """One timed input change for desktop simulation: ``at`` seconds after start, drive ``device``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float = Field(ge=0, description="Seconds after start.")
    device: str = Field(description="Input or button name.")
    value: bool = Field(description="true or false.")


class BoardConfig(BaseModel):
    """The hardware section: pin factory, devices by name and an optional simulation script."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pin_factory: str | None = Field(
        None, description="gpiozero pin factory: mock, lgpio, ... (null: GPIOZERO_PIN_FACTORY)."
    )
    # Lambdas, not the builtins dict/list: pydantic inspects a factory's signature, and for a
    # builtin that means tokenizing its text signature (milliseconds at the agent's start-up).
    devices: dict[str, DeviceConfig] = Field(
        default_factory=lambda: {}, description="Named devices: name: {kind, pin, ...}."
    )
    simulate: list[SimulatedChange] = Field(
        default_factory=lambda: [],
        description="Mock-pin input changes played once after start-up.",
    )

    @field_validator("pin_factory")
    @classmethod
    def _factory_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("pin_factory must be a factory name such as mock or lgpio, or null")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        owners: dict[int, str] = {}
        for name, device in self.devices.items():
            if not name.strip():
                raise ValueError("device names must not be empty")
            if device.pin in owners:
                raise ValueError(
                    f"devices {owners[device.pin]!r} and {name!r} both use BCM pin {device.pin}; "
                    "give each device its own pin"
                )
            owners[device.pin] = name
        for index, change in enumerate(self.simulate):
            target = self.devices.get(change.device)
            if target is None:
                known = ", ".join(repr(n) for n in self.devices) or "none"
                raise ValueError(
                    f"simulate[{index}] drives unknown device {change.device!r}; known devices: {known}"
                )
            if target.kind not in INPUT_KINDS:
                raise ValueError(
                    f"simulate[{index}] drives {change.device!r}, {with_article(target.kind)} device; "
                    "only input and button devices can be simulated"
                )
        return self

    def opened_at_safe_values(self) -> Self:
        """This config with every output's ``initial`` replaced by its ``safe`` value.

        The agent opens its board from this: an output must not switch on when the agent starts
        (a relay click, a pump stroke) only to be driven safe a moment later. ``initial`` is for a
        :class:`Board` used outside the agent."""
        devices = {
            name: device.model_copy(update={"initial": device.safe}) if device.is_output else device
            for name, device in self.devices.items()
        }
        return self.model_copy(update={"devices": devices})

    @classmethod
    def parse(cls, data: Any, *, source: str = "hardware config") -> Self:
        """Validate a mapping (parsed YAML), raising :class:`ConfigError` with one sentence per problem."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source} must be a mapping with a devices key, not {type(data).__name__}."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise config_error(exc, source=source) from None

    @classmethod
    def from_yaml(cls, path: str | PathLike[str]) -> Self:
        """Load a hardware config file. A file whose only key is ``hardware`` is unwrapped."""
        source = str(path)
        try:
            data, _ = safe_load_yaml(read_yaml_text(Path(path)))
        except OSError as exc:
            raise ConfigError(
                f"Cannot read hardware config {source}: {exc.strerror or exc}."
            ) from exc
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: the hardware config is not UTF-8 text.") from None
        except YamlRefused as exc:
            where = f"{source}:{exc.line}" if exc.line else source
            raise ConfigError(f"{where}: {exc.reason}.") from None
        except yaml.YAMLError as exc:
            problem, line = yaml_problem(exc)
            where = f"{source}:{line}" if line else source
            raise ConfigError(f"{where} is not valid YAML: {problem}.") from None
        if isinstance(data, Mapping) and set(data) == {"hardware"}:
            data = data["hardware"]
        return cls.parse(data, source=source)


def load_board_config(path: str | PathLike[str]) -> BoardConfig:
    """Load and validate a hardware config YAML file (see :meth:`BoardConfig.from_yaml`)."""
    return BoardConfig.from_yaml(path)


def config_error(exc: ValidationError, *, source: str) -> ConfigError:
    """Turn a pydantic error into a :class:`ConfigError` that names the device and the key."""
    problems = [_describe(error) for error in exc.errors()]
    if len(problems) == 1:
        message = f"{source}: {problems[0]}."
    else:
        message = f"{source} has {len(problems)} problems:\n" + "\n".join(
            f"- {problem}." for problem in problems
        )
    return ConfigError(message, problems=problems)


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ""
    if len(loc) >= 2 and loc[0] == "devices":
        where = f"device {loc[1]!r}"
        loc = loc[2:]
    elif len(loc) >= 2 and loc[0] == "simulate":
        where = f"simulate[{loc[1]}]"
        loc = loc[2:]
    if kind == "extra_forbidden":
        detail = f"unknown key {loc[-1]!r}" if loc else message
        if where.startswith("device"):
            detail += "; a device takes kind, pin, active_high, pull_up, bounce_time, initial, safe, frequency, description"
    elif kind == "missing":
        detail = f"missing required key {loc[-1]!r}" if loc else message
    elif loc and error["type"] != "value_error":
        detail = f"{'.'.join(str(part) for part in loc)}: {message}"
    else:
        detail = message
    return f"{where}: {detail}" if where else detail
