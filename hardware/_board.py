"""The board: gpiozero devices behind an asyncio-friendly API.

Threads meet the event loop in exactly one place, :meth:`Board._post`: gpiozero fires its callbacks on
its own threads (or on whichever thread drives a mock pin), and ``_post`` hands them to the loop with
``loop.call_soon_threadsafe``. Everything else here runs on the loop thread or is a plain,
non-blocking pin read or write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import FrozenInstanceError
from functools import partial
from types import TracebackType
from typing import Any, Self

from gpiozero import (
    Button,
    DigitalInputDevice,
    DigitalOutputDevice,
    GPIODevice,
    PWMOutputDevice,
)
from gpiozero.pins import Factory

from hardware._config import (
    INPUT_KINDS,
    OUTPUT_KINDS,
    BoardConfig,
    DeviceConfig,
    SimulatedChange,
)
from hardware._errors import (
    BoardClosed,
    DeviceTimeout,
    DeviceUnavailable,
    InvalidValue,
    MockPinsRequired,
    UnknownDevice,
    WrongDeviceKind,
    WrongEventLoop,
    with_article,
)
from hardware._factory import factory_name, resolve_pin_factory

log = logging.getLogger("edgesaga.hardware")

#: Edges kept per unread stream; beyond this the oldest are dropped (and a warning is logged).
EDGE_BUFFER = 256


class Edge:
    """An input changed: ``device`` became ``value`` at ``at`` (``time.monotonic()`` seconds).

    Immutable, compared and hashed by value: a frozen, slotted dataclass written out, because
    ``@dataclass`` generates its methods with ``exec`` when the class is defined, a noticeable
    cost in the agent's start-up.
    """

    __match_args__ = ("device", "value", "at")
    __slots__ = __match_args__

    device: str
    value: bool
    at: float

    def __init__(self, device: str, value: bool, at: float) -> None:
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "at", at)

    def __repr__(self) -> str:
        return f"Edge(device={self.device!r}, value={self.value!r}, at={self.at!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Edge) or other.__class__ is not self.__class__:
            return NotImplemented
        return (self.device, self.value, self.at) == (other.device, other.value, other.at)

    def __hash__(self) -> int:
        return hash((self.device, self.value, self.at))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __getstate__(self) -> tuple[str, bool, float]:
        return (self.device, self.value, self.at)

    def __setstate__(self, state: tuple[str, bool, float]) -> None:
        for name, value in zip(self.__match_args__, state, strict=True):
            object.__setattr__(self, name, value)


class _Closed:
    """Marker queued to an edge stream when its board closes."""


_CLOSED = _Closed()


class EdgeStream:
    """Async iterator over an input's edges, subscribed from the moment ``device.edges()`` returns.

    Use ``async with board["level"].edges() as edges: async for edge in edges: ...``; leaving the
    block (or :meth:`close`) unsubscribes. Iteration ends when the board closes.
    """

    def __init__(self, device: BoardDevice) -> None:
        self._device = device
        self._queue: asyncio.Queue[Edge | _Closed] = asyncio.Queue()
        self._finished = False
        self._dropped = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Edge:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _Closed):
            self.close()
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving edges; a pending ``async for`` ends after the queued ones."""
        if not self._finished:
            self._finished = True
            self._device._streams.discard(self)

    def _push(self, item: Edge | _Closed) -> None:
        if self._queue.qsize() >= EDGE_BUFFER:
            self._queue.get_nowait()
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "Edge stream for %r is not being read; dropping its oldest edges.",
                    self._device.name,
                )
        self._queue.put_nowait(item)


class BoardDevice:
    """One named device on a :class:`Board` (``board["pump"]``)."""

    def __init__(self, board: Board, name: str, config: DeviceConfig, gpio: GPIODevice) -> None:
        self._board = board
        self._name = name
        self._config = config
        self._gpio = gpio
        self._waiters: list[tuple[bool, asyncio.Future[bool]]] = []
        self._streams: set[EdgeStream] = set()

    def __repr__(self) -> str:
        return f"<BoardDevice {self._name!r} {self._config.kind} on BCM {self._config.pin}>"

    @property
    def name(self) -> str:
        """The device's name in the config."""
        return self._name

    @property
    def kind(self) -> str:
        """``output``, ``input``, ``button`` or ``pwm``."""
        return self._config.kind

    @property
    def config(self) -> DeviceConfig:
        """The validated config this device was built from."""
        return self._config

    @property
    def gpio(self) -> GPIODevice:
        """The underlying gpiozero device (its ``.pin`` is a ``MockPin`` under mock pins)."""
        return self._gpio

    @property
    def value(self) -> bool | float:
        """Current value: bool for digital devices (True = active), float 0..1 for pwm."""
        self._board._check_open()
        raw = self._gpio.value
        return float(raw) if self.kind == "pwm" else bool(raw)

    def set(self, value: bool | float) -> None:
        """Drive an output (True/False) or a pwm device (0.0 to 1.0; True/False mean 1.0/0.0)."""
        self._board._check_open()
        self._require(OUTPUT_KINDS, "be set")
        self._gpio.value = self.coerce(value)

    def on(self) -> None:
        """Switch the output fully on."""
        self.set(True)

    def off(self) -> None:
        """Switch the output off."""
        self.set(False)

    def coerce(self, value: Any) -> bool | float:
        """Check ``value`` fits this device and return it in the device's type.

        Outputs and inputs take ``True``/``False``, ``0``/``1`` or one of the words ``true``,
        ``false``, ``on``, ``off``, ``1``, ``0`` in any case; pwm devices a number from 0.0 to 1.0.
        Anything else raises :class:`InvalidValue`."""
        if self.kind == "pwm":
            if isinstance(value, bool):
                return 1.0 if value else 0.0
            if isinstance(value, int | float) and 0.0 <= float(value) <= 1.0:
                return float(value)
            raise InvalidValue(
                f"Device {self._name!r} is a pwm device; its value must be a number from 0.0 to 1.0, "
                f"not {value!r}."
            )
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        # Words too, for values that arrive as text (the CLI, a JSON client sending "false"): only
        # these, so that "yes", "2" or "maybe" is refused instead of read as true (or false).
        if isinstance(value, str) and value.lower() in ("1", "true", "on", "0", "false", "off"):
            return value.lower() in ("1", "true", "on")
        raise InvalidValue(
            f"Device {self._name!r} is {with_article(self.kind)} device; "
            f"its value must be true or false, not {value!r}."
        )

    # ASYNC109: the timeout is part of the contract: on expiry we raise DeviceTimeout naming the
    # device and the value, which a bare asyncio.timeout around the call could not say.
    async def wait_for(self, value: bool = True, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Return once the input is ``value`` (at once if it already is).

        Raises :class:`DeviceTimeout` (a ``TimeoutError``) naming the device after ``timeout`` seconds;
        ``None`` waits forever. Nothing polls: gpiozero's edge callback wakes the waiter.
        """
        self._require(INPUT_KINDS, "be waited on")
        target = self.coerce(value)
        if timeout is not None and timeout < 0:
            raise InvalidValue(f"timeout must be zero or more seconds, not {timeout!r}.")
        loop = self._board._bind_loop()
        if self.value == target:
            return bool(target)
        # Registered before we next yield, so an edge reported after the read above is not missed:
        # its _deliver is queued on this loop and runs only after we start waiting.
        future: asyncio.Future[bool] = loop.create_future()
        waiter = (bool(target), future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                return future.result()
            raise DeviceTimeout(self._name, bool(target), timeout or 0.0) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def edges(self) -> EdgeStream:
        """Subscribe to this input's edges; must be called inside a coroutine on the board's loop."""
        self._require(INPUT_KINDS, "report edges")
        self._board._check_open()
        self._board._bind_loop()
        stream = EdgeStream(self)
        self._streams.add(stream)
        return stream

    def _require(self, kinds: tuple[str, ...], operation: str) -> None:
        if self.kind not in kinds:
            raise WrongDeviceKind(self._name, self.kind, operation, kinds)

    def _deliver(self, value: bool, at: float) -> None:
        """Runs on the loop (scheduled by :meth:`Board._post`)."""
        edge = Edge(self._name, value, at)
        for stream in list(self._streams):
            stream._push(edge)
        for target, future in self._waiters:
            if target == value and not future.done():
                future.set_result(value)

    def _shut(self) -> None:
        """Runs on the loop when the board closes: end streams, fail waiters."""
        for stream in list(self._streams):
            stream._push(_CLOSED)
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(
                    BoardClosed(f"The board was closed while waiting for {self._name!r}.")
                )


class Board:
    """Named gpiozero devices with an async API, safe states and desktop simulation.

    ``devices`` maps names to :class:`DeviceConfig` (or plain mappings, validated here).
    ``pin_factory`` is a factory name (``"mock"``, ``"lgpio"``, ...) or a gpiozero ``Factory``;
    without one, ``GPIOZERO_PIN_FACTORY`` decides, else gpiozero's default. ``loop`` is the event
    loop that receives GPIO events; by default the running loop is captured on first async use.
    """

    def __init__(
        self,
        *,
        devices: Mapping[str, DeviceConfig | Mapping[str, Any]],
        pin_factory: str | Factory | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        simulate: Iterable[SimulatedChange | Mapping[str, Any]] = (),
    ) -> None:
        self._config = BoardConfig.parse(
            {
                "pin_factory": pin_factory if isinstance(pin_factory, str) else None,
                "devices": dict(devices),
                "simulate": list(simulate),
            },
            source="Board(devices=...)",
        )
        self._loop = loop
        self._closed = False
        self._devices: dict[str, BoardDevice] = {}
        self._factory, self._owns_factory = resolve_pin_factory(pin_factory)
        try:
            for name, device_config in self._config.devices.items():
                self._devices[name] = BoardDevice(
                    self, name, device_config, self._open(name, device_config)
                )
        except BaseException:
            self._release()
            raise
        log.info(
            "Board ready with %s pins: %s",
            factory_name(self._factory),
            ", ".join(f"{n}={d.kind}@BCM{d.config.pin}" for n, d in self._devices.items())
            or "none",
        )

    @classmethod
    def from_config(
        cls,
        config: BoardConfig,
        *,
        pin_factory: str | Factory | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Self:
        """Build a board from a :class:`BoardConfig`; ``pin_factory`` overrides the config's."""
        return cls(
            devices=config.devices,
            pin_factory=pin_factory if pin_factory is not None else config.pin_factory,
            loop=loop,
            simulate=config.simulate,
        )

    # -- construction and teardown -------------------------------------------------------------

    def _open(self, name: str, config: DeviceConfig) -> GPIODevice:
        try:
            gpio: GPIODevice
            if config.kind == "output":
                gpio = DigitalOutputDevice(
                    config.pin,
                    active_high=config.effective_active_high,
                    initial_value=config.initial_value,
                    pin_factory=self._factory,
                )
            elif config.kind == "pwm":
                gpio = PWMOutputDevice(
                    config.pin,
                    active_high=config.effective_active_high,
                    initial_value=config.initial_value,
                    frequency=config.pwm_frequency,
                    pin_factory=self._factory,
                )
            else:
                pull = config.effective_pull_up
                cls = Button if config.kind == "button" else DigitalInputDevice
                gpio = cls(
                    config.pin,
                    pull_up=pull,
                    active_state=config.effective_active_high if pull is None else None,
                    bounce_time=config.bounce_time,
                    pin_factory=self._factory,
                )
                # Bound methods wrapped in partial: gpiozero calls them with no arguments.
                gpio.when_activated = partial(self._gpio_event, name, True)
                gpio.when_deactivated = partial(self._gpio_event, name, False)
        except Exception as exc:
            raise DeviceUnavailable(
                f"Cannot open {config.kind} device {name!r} on BCM pin {config.pin} with "
                f"{factory_name(self._factory)} pins: {exc}. Check that no other program or board "
                "uses the pin."
            ) from exc
        return gpio

    def close(self) -> None:
        """Drive outputs to their safe values, then release every pin. Safe to call twice."""
        if self._closed:
            return
        try:
            self.safe_state()
        except Exception:
            log.exception("Could not drive every output to its safe value while closing the board.")
        self._closed = True
        self._release()
        self._post(self._shut_all)

    def _release(self) -> None:
        for name, device in self._devices.items():
            try:
                device.gpio.close()
            except Exception:
                log.exception("Closing device %r failed.", name)
        if self._owns_factory:
            try:
                self._factory.close()
            except Exception:
                log.exception("Closing the pin factory failed.")

    def _shut_all(self) -> None:
        for device in self._devices.values():
            device._shut()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the one place where gpiozero threads meet the event loop -----------------------------

    def _gpio_event(self, name: str, value: bool) -> None:
        """gpiozero callback, on a gpiozero thread (or whichever thread drove a mock pin)."""
        device = self._devices.get(name)  # None for an edge during construction: nobody waits yet
        if device is not None:
            self._post(device._deliver, value, time.monotonic())

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # nothing async has subscribed yet, or its loop is gone: nobody to tell
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(callback, *args)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        running = asyncio.get_running_loop()
        loop = self._loop
        if loop is running:
            return running
        if loop is None or loop.is_closed():
            self._loop = running
            return running
        raise WrongEventLoop(
            "This board already delivers GPIO events to another event loop that is still open; "
            "create the board inside the loop that uses it, or pass loop= to Board()."
        )

    # -- public API ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> BoardDevice:
        self._check_open()
        try:
            return self._devices[name]
        except KeyError:
            raise UnknownDevice(name, self._devices) from None

    def __contains__(self, name: object) -> bool:
        return name in self._devices

    def __iter__(self) -> Iterator[str]:
        return iter(self._devices)

    def __len__(self) -> int:
        return len(self._devices)

    def __repr__(self) -> str:
        state = "closed" if self._closed else factory_name(self._factory)
        return f"<Board {state} devices={list(self._devices)}>"

    @property
    def config(self) -> BoardConfig:
        """The validated config (devices, pin factory name, simulation script)."""
        return self._config

    @property
    def pin_factory(self) -> Factory:
        """The gpiozero pin factory in use."""
        return self._factory

    @property
    def is_mock(self) -> bool:
        """True when the pins are gpiozero mock pins (desktop, CI)."""
        from gpiozero.pins.mock import MockFactory

        return isinstance(self._factory, MockFactory)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop GPIO events go to (None until first async use unless given)."""
        return self._loop

    def snapshot(self) -> dict[str, bool | float]:
        """Every device's current value, by name, in config order."""
        return {name: device.value for name, device in self._devices.items()}

    def safe_state(self, names: Iterable[str] | None = None) -> dict[str, bool | float]:
        """Drive every output and pwm device (or only those in ``names``) to its ``safe`` value.

        Inputs among ``names`` are skipped, so a workflow's ``resources`` can be passed as is. Every
        known output is driven even if one fails or a name is unknown; the first problem is raised
        afterwards. Returns the values set. Does nothing once the board is closed.
        """
        if self._closed:
            return {}
        if isinstance(names, str):
            names = [names]
        selected = list(self._devices) if names is None else list(names)
        applied: dict[str, bool | float] = {}
        problems: list[Exception] = []
        for name in selected:
            device = self._devices.get(name)
            if device is None:
                problems.append(UnknownDevice(name, self._devices))
            elif device.config.is_output:
                try:
                    device.set(device.config.safe_value)
                    applied[name] = device.config.safe_value
                except Exception as exc:
                    log.exception("Could not drive %r to its safe value.", name)
                    problems.append(exc)
        if problems:
            raise problems[0]
        return applied

    def set_input(self, name: str, value: bool) -> None:
        """Drive a mock input pin so the device reads ``value`` (honours the pull and active level)."""
        device = self[name]
        device._require(INPUT_KINDS, "be driven by set_input")
        target = device.coerce(value)
        if not self.is_mock:
            raise MockPinsRequired(
                f"Cannot drive input {name!r} from software: the board uses real "
                f"{factory_name(self._factory)} pins. set_input and simulate need mock pins: set "
                "GPIOZERO_PIN_FACTORY=mock or put `pin_factory: mock` in the hardware config."
            )
        pin = device.gpio.pin  # a gpiozero MockPin, since the factory is a MockFactory
        if bool(target) == device.config.effective_active_high:
            pin.drive_high()
        else:
            pin.drive_low()

    def simulate(
        self, changes: Iterable[SimulatedChange | Mapping[str, Any]] | None = None
    ) -> Coroutine[Any, Any, None]:
        """Return a coroutine that applies timed input changes (default: the config's ``simulate``).

        The changes are checked now, so mistakes surface before anything runs. The caller owns the
        task: ``tg.create_task(board.simulate(), name="simulate")``. Times count from when the
        coroutine starts, with ``asyncio.sleep`` in between.
        """
        self._check_open()
        if changes is None:
            plan = list(self._config.simulate)
        else:
            plan = [
                c if isinstance(c, SimulatedChange) else SimulatedChange.model_validate(c)
                for c in changes
            ]
        for change in plan:
            self[change.device]._require(INPUT_KINDS, "be simulated")
        if plan and not self.is_mock:
            raise MockPinsRequired(
                f"Cannot simulate inputs on real {factory_name(self._factory)} pins; simulation needs "
                "mock pins: set GPIOZERO_PIN_FACTORY=mock or put `pin_factory: mock` in the config."
            )
        return self._run_simulation(sorted(plan, key=lambda c: c.at))

    async def _run_simulation(self, plan: list[SimulatedChange]) -> None:
        loop = self._bind_loop()
        start = loop.time()
        for change in plan:
            delay = start + change.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._closed:
                return
            log.info("simulate: %s -> %s at +%.2f s", change.device, change.value, change.at)
            self.set_input(change.device, change.value)

    def _check_open(self) -> None:
        if self._closed:
            raise BoardClosed("The board is closed; create a new Board to use the pins again.")
