"""``edgesaga fleet``: one line per device sharing a broker, from the retained topics alone.

Every agent keeps ``<prefix>/<device>/availability`` (``online``/``offline``, the last will) and
``<prefix>/<device>/workflows/<id>/state`` (the latest snapshot) retained on the broker, so a
fresh subscriber sees the whole fleet at once. Nothing here talks to an agent: the broker is the
only shared part. The connection is :mod:`agent._transport`'s, as for ``edgesaga watch``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from agent._config import MqttSettings, TlsSettings
from agent._errors import AgentError

if TYPE_CHECKING:  # paho is imported by the transport only when the command runs
    import paho.mqtt.client as paho

#: At most this many devices are tracked; messages of further devices are counted, not kept.
MAX_DEVICES = 1000
#: At most this many workflows (over all devices) are tracked; further snapshots are counted.
MAX_WORKFLOWS = 100_000
#: A state snapshot is a few hundred bytes; larger payloads are ignored as malformed.
MAX_STATE_PAYLOAD = 8192
#: Availability is ``online`` or ``offline``; anything longer is malformed.
MAX_AVAILABILITY_PAYLOAD = 16
#: A watch redraws at most this often (seconds): a burst of snapshots makes one frame.
REDRAW_EVERY = 0.2
#: A one-shot view stops gathering after this long without a new message (retained messages
#: follow the SUBACK at once), or at ``--timeout``.
QUIET = 0.3
#: ``--timeout`` is at least this (seconds): time for the quiet gap that ends the burst.
MIN_TIMEOUT = 1.0

_ACTIVE = frozenset({"ACTIVE", "COMPENSATING"})
_FAILED = frozenset({"FAILED", "FAILED_ROLLED_BACK", "COMPENSATION_FAILED"})
_STATUSES = frozenset(
    {"PAUSED", "COMPLETED", "CANCELLED"} | _ACTIVE | _FAILED
)  # WorkflowStatus, without importing the engine


class FleetError(AgentError):
    """The fleet view cannot be shown (bad arguments, unreachable broker): one sentence."""


# ------------------------------------------------------------------------------------------------
# The view


@dataclass(slots=True)
class Device:
    """What the retained topics say about one device."""

    availability: str | None = None  # "online", "offline", or None: not published (or cleared)
    workflows: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # id -> status, at


@dataclass(slots=True)
class Fleet:
    """The devices under one prefix, fed message by message; bounded by :data:`MAX_DEVICES` and
    :data:`MAX_WORKFLOWS`."""

    prefix: str
    devices: dict[str, Device] = field(default_factory=dict)
    workflows: int = 0
    malformed: int = 0  # payloads or topics that are not what an agent publishes
    untracked: int = 0  # messages dropped because a bound was reached
    complete: bool = True  # False: messages were still arriving when gathering stopped

    def feed(self, topic: str, payload: bytes) -> bool:
        """Take one message; True when the view changed."""
        base = self.prefix + "/"
        levels = topic[len(base) :].split("/") if topic.startswith(base) else []
        if len(levels) == 2 and levels[1] == "availability":
            return self._availability(levels[0], payload)
        if len(levels) == 4 and levels[1] == "workflows" and levels[3] == "state":
            return self._state(levels[0], levels[2], payload)
        self.malformed += 1
        return False

    def _device(self, device_id: str) -> Device | None:
        device = self.devices.get(device_id)
        if device is None:
            if len(self.devices) >= MAX_DEVICES:
                self.untracked += 1
                return None
            device = self.devices[device_id] = Device()
        return device

    def _availability(self, device_id: str, payload: bytes) -> bool:
        if payload == b"":  # a cleared topic
            value = None
        elif len(payload) <= MAX_AVAILABILITY_PAYLOAD and payload in (b"online", b"offline"):
            value = payload.decode()
        else:
            self.malformed += 1
            return False
        device = self._device(device_id)
        if device is None or device.availability == value:
            return False
        device.availability = value
        return True

    def _state(self, device_id: str, workflow_id: str, payload: bytes) -> bool:
        if payload == b"":  # cleared by retention
            device = self.devices.get(device_id)
            if device is None or device.workflows.pop(workflow_id, None) is None:
                return False
            self.workflows -= 1
            return True
        entry = _snapshot(payload)
        if entry is None:
            self.malformed += 1
            return False
        device = self._device(device_id)
        if device is None:
            return False
        known = device.workflows.get(workflow_id)
        if known is None and self.workflows >= MAX_WORKFLOWS:
            self.untracked += 1
            return False
        if known == entry:
            return False
        if known is None:
            self.workflows += 1
        device.workflows[workflow_id] = entry
        return True

    def rows(self) -> list[dict[str, Any]]:
        """One summary per device, sorted by device id."""
        out = []
        for device_id in sorted(self.devices):
            device = self.devices[device_id]
            statuses = [s for s, _ in device.workflows.values()]
            times = [t for _, t in device.workflows.values() if t is not None]
            out.append(
                {
                    "device_id": device_id,
                    "availability": device.availability or "unknown",
                    "active": sum(s in _ACTIVE for s in statuses),
                    "paused": statuses.count("PAUSED"),
                    "failed": sum(s in _FAILED for s in statuses),
                    "workflows": len(statuses),
                    "last_event": max(times) if times else None,
                }
            )
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "devices": self.rows(),
            "malformed_ignored": self.malformed,
            "untracked": self.untracked,
            "complete": self.complete,
        }


def _snapshot(payload: bytes) -> tuple[str, str | None] | None:
    """``(status, updated_at)`` of a state snapshot, or None when it is not one."""
    if len(payload) > MAX_STATE_PAYLOAD:
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError, UnicodeError):
        return None
    if not isinstance(value, dict):
        return None
    status, at = value.get("status"), value.get("updated_at")
    if status not in _STATUSES or not (at is None or (isinstance(at, str) and len(at) <= 40)):
        return None
    return str(status), at


_HEADER = ("DEVICE", "STATE", "ACTIVE", "PAUSED", "FAILED", "LAST EVENT")


def render(fleet: Fleet) -> str:
    """The table: a header, one line per device, and a note on what was ignored."""
    rows = fleet.rows()
    width = max([len(_HEADER[0]), *(len(r["device_id"]) for r in rows)])
    lines = [
        f"{_HEADER[0]:<{width}}  {_HEADER[1]:<7}  {_HEADER[2]:>6}  {_HEADER[3]:>6}  "
        f"{_HEADER[4]:>6}  {_HEADER[5]}"
    ]
    for r in rows:
        lines.append(
            f"{r['device_id']:<{width}}  {r['availability']:<7}  {r['active']:>6}  "
            f"{r['paused']:>6}  {r['failed']:>6}  {r['last_event'] or '-'}"
        )
    if not rows:
        lines.append(f"(no device has published under {fleet.prefix}/)")
    notes = []
    if fleet.malformed:
        notes.append(f"{fleet.malformed} malformed messages ignored")
    if fleet.untracked:
        notes.append(
            f"{fleet.untracked} messages beyond {MAX_DEVICES} devices or {MAX_WORKFLOWS} "
            "workflows not counted"
        )
    if not fleet.complete:
        notes.append("still receiving when the time was up: give a longer --timeout")
    if notes:
        lines.append(f"({'; '.join(notes)})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Reading the broker


def parse_broker(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port or None)."""
    if not text or len(text) > 300 or any(c.isspace() for c in text):
        raise FleetError(f"--broker {text[:300]!r} is not HOST or HOST:PORT, e.g. 127.0.0.1:1883.")
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise FleetError(f"--broker {text!r} is not [IPv6]:PORT, e.g. [::1]:1883.")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        port_text = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise FleetError(f"--broker {text!r}: the port must be a number from 1 to 65535.")
        port = int(port_text)
    if not host:
        raise FleetError(f"--broker {text!r} names no host; give HOST or HOST:PORT.")
    return host, port


def settings_from(args: argparse.Namespace) -> MqttSettings:
    """The broker settings: the agent config's ``mqtt`` section (``--config``) if given, then the
    command line over it."""
    base = MqttSettings()
    if args.config:
        from agent._config import load_config

        base = load_config(args.config).mqtt
    host, port = parse_broker(args.broker)
    updates: dict[str, Any] = {"host": host}
    if port is not None:
        updates["port"] = port
    if args.prefix is not None:
        updates["topic_prefix"] = args.prefix
    if args.username is not None:
        updates["username"] = args.username
    if args.password_file is not None:
        updates["password_file"] = args.password_file
    if args.ca_file is not None:
        updates["tls"] = TlsSettings(ca_file=args.ca_file)
    if args.mqtt_version is not None:
        updates["version"] = args.mqtt_version
    try:
        # validated again: a prefix with a wildcard is refused in the config's own sentence
        return MqttSettings.model_validate({**base.model_dump(), **updates})
    except ValidationError as exc:
        raise FleetError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


async def _connect(
    settings: MqttSettings, on_message: Callable[[Any, paho.MQTTMessage], None]
) -> Any:
    from agent._transport import ClientOptions, ConnectFailed, open_connection

    try:
        conn, _ = await open_connection(
            settings,
            f"edgesaga-fleet-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            ClientOptions(persistent=False, will_topic=None, manual_ack=False, inflight=20),
            receive_maximum=100,
            on_message=on_message,
            on_lost=lambda _c: None,
            on_puback=lambda: None,
        )
    except ConnectFailed as err:
        raise FleetError(f"{err.message}; check --broker (and the TLS and user options).") from None
    return conn


async def _subscribe(conn: Any, prefix: str) -> None:
    from agent._transport import Lost

    topics = [(f"{prefix}/+/availability", 1), (f"{prefix}/+/workflows/+/state", 1)]
    try:
        codes = await conn.subscribe(topics, v5_options=None)
    except Lost as exc:
        raise FleetError(f"the MQTT broker did not accept the subscription ({exc}).") from None
    if any(c.is_failure for c in codes):
        raise FleetError(
            f"the MQTT broker refused the subscription to {prefix}/+/availability and "
            f"{prefix}/+/workflows/+/state; check the broker's ACL for this user."
        )


class _Inbox:
    """Messages from the network thread, handed to the loop (fed to the view as fast as they
    come: each costs a dictionary update)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

    def on_message(self, _conn: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # counted as malformed
        self.queue.put_nowait((topic, bytes(message.payload)))


async def gather(settings: MqttSettings, within: float) -> Fleet:
    """Connect, subscribe, and take the retained burst (see :func:`_take`)."""
    fleet = Fleet(settings.topic_prefix)
    inbox = _Inbox()
    conn = await _connect(settings, inbox.on_message)
    try:
        await _subscribe(conn, settings.topic_prefix)
        await _take(inbox, fleet, within)
    finally:
        await conn.close(clean=True)
    return fleet


async def _take(inbox: _Inbox, fleet: Fleet, within: float) -> None:
    """Feed ``fleet`` until no message came for :data:`QUIET` seconds (retained messages follow
    the SUBACK at once), or for at most ``within`` seconds; then ``fleet.complete`` is False."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = loop.time()  # of the SUBACK, then of the latest message
    while (now := loop.time()) < last + QUIET:
        if now >= deadline:
            fleet.complete = False  # still arriving when the time was up
            return
        try:
            item = await asyncio.wait_for(inbox.queue.get(), min(last + QUIET, deadline) - now)
        except TimeoutError:
            continue
        last = loop.time()
        if item is not None:
            fleet.feed(*item)


def _frame(fleet: Fleet, as_json: bool, *, tty: bool, watching: bool) -> str:
    """One frame: a JSON object on one line, or the table; a watched table ends with an empty
    line (a pipe) or first clears the screen (a terminal)."""
    if as_json:
        return json.dumps(fleet.as_json(), sort_keys=True) + "\n"
    if not watching:
        return render(fleet) + "\n"
    return f"\x1b[H\x1b[2J{render(fleet)}\n" if tty else f"{render(fleet)}\n\n"


async def watch(
    settings: MqttSettings, out: TextIO, *, as_json: bool, within: float, stop: asyncio.Event
) -> None:
    """Print a frame, then a new one after every change (at most every :data:`REDRAW_EVERY` s),
    until ``stop`` is set."""
    fleet = Fleet(settings.topic_prefix)
    inbox = _Inbox()
    conn = await _connect(settings, inbox.on_message)
    tty = out.isatty()
    try:
        await _subscribe(conn, settings.topic_prefix)
        await _take(inbox, fleet, within)
        shown = _frame(fleet, as_json, tty=tty, watching=True)
        out.write(shown)
        out.flush()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set() and not conn.closed.done():
                getter = asyncio.ensure_future(inbox.queue.get())
                await asyncio.wait(
                    {getter, stopper, conn.closed}, return_when=asyncio.FIRST_COMPLETED
                )
                if not getter.done():
                    getter.cancel()
                    continue
                item = getter.result()
                changed = item is not None and fleet.feed(*item)
                if changed:
                    await asyncio.sleep(REDRAW_EVERY)  # gather the rest of a burst
                    while not inbox.queue.empty():
                        more = inbox.queue.get_nowait()
                        if more is not None:
                            fleet.feed(*more)
                    frame = _frame(fleet, as_json, tty=tty, watching=True)
                    if frame != shown:
                        out.write(frame)
                        out.flush()
                        shown = frame
        finally:
            stopper.cancel()
        if conn.closed.done() and not stop.is_set():
            raise FleetError(
                f"lost the connection to the MQTT broker {settings.host}:{settings.port} "
                f"({conn.closed.result()}); run edgesaga fleet again once it is back."
            )
    finally:
        await conn.close(clean=True)


# ------------------------------------------------------------------------------------------------
# The command


async def cmd_fleet(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``edgesaga fleet``: print the table (or ``--json``) once, or keep it live (``--watch``,
    until Ctrl-C or SIGTERM, exit 0)."""
    out = out or sys.stdout
    if not MIN_TIMEOUT <= args.timeout <= 60:
        raise FleetError(f"--timeout must be from {MIN_TIMEOUT} to 60 seconds.")
    settings = settings_from(args)
    if not args.watch:
        fleet = await gather(settings, args.timeout)
        out.write(_frame(fleet, args.json, tty=False, watching=False))
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        await watch(settings, out, as_json=args.json, within=args.timeout, stop=stop)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    return 0


def add_fleet_parser(subparsers: Any) -> None:
    """Add ``edgesaga fleet`` to the CLI's sub-command parsers (``argparse`` sub-parsers)."""
    sp = subparsers.add_parser(
        "fleet",
        help="one line per device on a broker: online/offline, active, paused, failed, last event",
        description=(
            "Read the retained availability and workflow state topics of every device under the "
            "topic prefix and print one line per device: online or offline (the last will of an "
            "agent that died), its active, paused and failed workflows and its last event time. "
            "--watch keeps the table live until Ctrl-C."
        ),
    )
    sp.add_argument("--broker", required=True, metavar="HOST[:PORT]", help="the shared broker")
    sp.add_argument("--prefix", help="the agents' mqtt.topic_prefix (default edgesaga)")
    sp.add_argument("--watch", action="store_true", help="redraw on every change until Ctrl-C")
    sp.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="read the retained burst for at most S seconds, 1 to 60 (default 2; stops once "
        "nothing came for 0.3 s)",
    )
    sp.add_argument("--json", action="store_true", help="the devices as one JSON object")
    sp.add_argument("--config", help="agent config whose mqtt section gives TLS and user settings")
    sp.add_argument("--username", help="MQTT user name")
    sp.add_argument("--password-file", metavar="PATH", help="file holding the MQTT password")
    sp.add_argument("--ca-file", metavar="PATH", help="connect with TLS, trusting this CA")
    sp.add_argument("--mqtt-version", choices=["5", "3.1.1"], help="default 5 (or the config's)")
    sp.set_defaults(func=cmd_fleet)
