"""Choosing the gpiozero pin factory: config, then ``GPIOZERO_PIN_FACTORY``, then gpiozero's default.

gpiozero loads its backends lazily, so nothing here imports lgpio (or any other driver) until a
factory with that name is asked for.
"""

from __future__ import annotations

import logging
import os
import warnings
from importlib.metadata import entry_points

from gpiozero import Device
from gpiozero.pins import Factory

from hardware._errors import ConfigError, NoPinFactory

log = logging.getLogger("edgesaga.hardware")

ENV_VAR = "GPIOZERO_PIN_FACTORY"
MOCK_NAMES = frozenset({"mock", "mockpwm"})
_MOCK_HINT = (
    "To run without GPIO hardware (desktop, CI), use mock pins: set GPIOZERO_PIN_FACTORY=mock in the "
    "environment or put `pin_factory: mock` in the hardware config. On a Raspberry Pi 5 install "
    "lgpio (sudo apt install python3-lgpio) and use `pin_factory: lgpio`."
)


def resolve_pin_factory(spec: str | Factory | None) -> tuple[Factory, bool]:
    """Return ``(factory, owned)``; ``owned`` is True when the caller created it and must close it."""
    if isinstance(spec, Factory):
        return spec, False
    if spec is not None and not isinstance(spec, str):
        raise ConfigError(
            f"pin_factory must be a factory name (such as 'mock' or 'lgpio') or a gpiozero Factory, "
            f"not {type(spec).__name__}."
        )
    source = "the hardware config"
    if spec is None:
        spec = os.environ.get(ENV_VAR) or None
        source = f"the {ENV_VAR} environment variable"
    if spec is None:
        return _gpiozero_default(), False
    return _named_factory(spec, source), True


def new_mock_factory() -> Factory:
    """A gpiozero ``MockFactory`` whose pins support PWM."""
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    return MockFactory(pin_class=MockPWMPin)


def _named_factory(name: str, source: str) -> Factory:
    if name.strip().lower() in MOCK_NAMES:
        return new_mock_factory()
    group = list(entry_points(group="gpiozero_pin_factories"))
    match = next((ep for ep in group if ep.name == name), None) or next(
        (ep for ep in group if ep.name == name.strip().lower()), None
    )
    if match is None:
        known = ", ".join(sorted({ep.name for ep in group} | {"mock"}))
        raise ConfigError(f"Unknown pin factory {name!r} (from {source}); use one of: {known}.")
    try:
        factory = match.load()()
    except Exception as exc:
        raise NoPinFactory(
            f"Cannot open the {name!r} pin factory named in {source}: {exc}. {_MOCK_HINT}"
        ) from exc
    if not isinstance(factory, Factory):  # pragma: no cover - a broken third-party entry point
        raise NoPinFactory(f"The {name!r} entry point did not produce a gpiozero Factory.")
    return factory


def _gpiozero_default() -> Factory:
    # gpiozero warns (PinFactoryFallback) for every backend it cannot load before giving up; those
    # reasons belong in our error message or the log, not in the user's warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            Device.ensure_pin_factory()
        except Exception as exc:
            reasons = [str(w.message) for w in caught] + [str(exc)]
            raise NoPinFactory(
                "No GPIO pin factory could be loaded, so this machine seems to have no usable GPIO "
                f"({'; '.join(reasons)}). {_MOCK_HINT}"
            ) from exc
    for warning in caught:
        log.info("gpiozero: %s", warning.message)
    factory = Device.pin_factory
    if factory is None:  # pragma: no cover - ensure_pin_factory either sets it or raises
        raise NoPinFactory(f"gpiozero did not select a pin factory. {_MOCK_HINT}")
    return factory


def factory_name(factory: Factory) -> str:
    """A short name for messages: ``mock``, ``lgpio``... derived from the class name."""
    name = type(factory).__name__.removesuffix("Factory")
    return name.lower() or type(factory).__name__
