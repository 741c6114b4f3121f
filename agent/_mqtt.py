"""The MQTT link (DESIGN §8): commands in; replies, events, alerts and retained state out.

Why paho-mqtt directly rather than aiomqtt 2.x on top of it (so aiomqtt is not a dependency):

* **Manual acknowledgements.** A command is PUBACKed only after its reply was published (and the
  broker acknowledged that reply), so a command cut short by a crash or a lost connection is
  delivered again (request-id dedupe in :class:`agent._control.Control` makes the repeat safe). It
  also gives back-pressure for free: the broker sends at most *Receive Maximum* unacknowledged
  commands, so a flood queues at the broker, not in the agent's memory. aiomqtt 2 always
  acknowledges on receipt.
* **A lost connection fails every publish still waiting for its PUBACK at once**, so the outbox
  drainer stops and resumes from the first unacknowledged item after reconnecting; aiomqtt 2 waits
  for each publish's own timeout.
* **A fresh client per connection**: nothing paho queued for an old connection is resent behind the
  outbox's back; the outbox (SQLite) is the only record of what is still to be published.

Threads meet the loop in one place, :class:`_Connection`: paho's network thread (``loop_start``)
runs its callbacks, and each callback only hands its arguments to the event loop with
``call_soon_threadsafe``. Everything else here runs on the loop. The blocking parts of connecting
(DNS, TCP, TLS handshake, reading the password file) run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import random
import socket
import sqlite3
import ssl
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent._commands import error_reply

# The settings models live with the rest of the agent config, which `edgesaga run` loads before
# READY; this module (and paho) are imported after READY. Re-exported here for existing imports.
from agent._config import MqttSettings as MqttSettings
from agent._config import TlsSettings as TlsSettings
from agent._store import OutboxItem, SQLiteStore, iso

log = logging.getLogger("edgesaga.mqtt")

#: ``handler(command_name, payload) -> (reply, reply_to)``, i.e. :meth:`Control.handle_raw`.
Handler = Callable[[str, bytes], Awaitable[tuple[dict[str, Any], str | None]]]

_CONNECT_TIMEOUT = 10.0  # seconds for TCP + TLS + CONNACK
_SUBACK_TIMEOUT = 10.0
_REPLY_TIMEOUT = 10.0  # seconds to wait for the PUBACK of a reply before giving up on it
_OFFLINE_TIMEOUT = 2.0  # seconds a clean stop waits for the PUBACK of `offline`
_MAX_QOS0_BACKLOG = (
    1000  # QoS 0 commands beyond this backlog are dropped (QoS 1 is bounded by the broker)
)


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names of one device under a prefix."""

    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def commands(self) -> str:
        """The subscription filter for commands."""
        return f"{self.base}/cmd/+"

    @property
    def command_base(self) -> str:
        return f"{self.base}/cmd/"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def alerts(self) -> str:
        return f"{self.base}/alerts"

    def state(self, workflow_id: str) -> str:
        return f"{self.base}/workflows/{workflow_id}/state"


def _topic_safe(level: str) -> bool:
    return bool(level) and not any(c in level for c in "/+#\x00")


_MAX_REPLY_TOPIC = 500  # characters, as for `reply_to` in the command model
#: The topics the protocol defines for every device, ``<prefix>/<device>/<level>[/...]``: a reply
#: there would pass for an agent's own message or for a command (issue 10, #11).
_PROTOCOL_LEVELS = frozenset({"cmd", "events", "alerts", "availability", "workflows"})


def _unprintable(topic: str) -> bool:
    """A NUL, control character (C0, DEL, C1), Unicode noncharacter (U+FDD0..U+FDEF, U+xFFFE,
    U+xFFFF) or lone surrogate: Mosquitto drops the connection of a client that publishes to such a
    topic ("malformed packet"), and paho cannot encode a surrogate."""
    for c in topic:
        n = ord(c)
        if (
            n < 0x20
            or 0x7F <= n <= 0x9F
            or 0xD800 <= n <= 0xDFFF
            or 0xFDD0 <= n <= 0xFDEF
            or n & 0xFFFE == 0xFFFE
        ):
            return True
    return False


def reply_refusal(topic: str, settings: MqttSettings) -> str | None:
    """Why the agent will not publish a reply to ``topic`` (a ``reply_to`` or MQTT 5 response
    topic), as the end of a sentence; None when it may.

    Refused: an empty, oversize or unprintable topic, wildcards, ``$`` topics (the broker's), and
    anything under ``topic_prefix`` unless ``reply_to_allow`` lists it; the protocol's own topics
    of any device (cmd, events, alerts, availability, workflows) are refused whatever the list says.
    """
    if not topic:
        return "is empty"
    if len(topic) > _MAX_REPLY_TOPIC:
        return f"is longer than {_MAX_REPLY_TOPIC} characters"
    if "+" in topic or "#" in topic:
        return "contains a wildcard ('+' or '#'), which no one can publish to"
    if _unprintable(topic):
        return "contains a control character, a Unicode noncharacter or text that is not UTF-8"
    if topic.startswith("$"):
        return "starts with '$', which is reserved for the broker"
    prefix = settings.topic_prefix
    if topic != prefix and not topic.startswith(prefix + "/"):
        return None
    levels = topic[len(prefix) + 1 :].split("/")
    if len(levels) >= 2 and levels[1] in _PROTOCOL_LEVELS:
        return (
            f"is one of the protocol's own topics under {prefix}/ (cmd, events, alerts, "
            "availability or workflows of a device); reply to a topic outside the prefix"
        )
    if any(paho.topic_matches_sub(f, topic) for f in settings.reply_to_allow):
        return None
    return (
        f"is under the topic prefix {prefix}/, where a reply could pass for the agents' own "
        "messages; reply to a topic outside it, or list it in mqtt.reply_to_allow"
    )


def _peek_command(payload: bytes, max_payload: int) -> dict[str, Any] | None:
    """The command object in ``payload``, or None (too large, not JSON, not an object): what a
    refusal needs to address its error reply. Never raises."""
    if len(payload) > max_payload:
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError, UnicodeError):
        return None
    return value if isinstance(value, dict) else None


def _request_id_of(body: dict[str, Any] | None) -> str | None:
    rid = body.get("request_id") if body is not None else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 200 else None


# ------------------------------------------------------------------------------------------------
# One connection: the only place paho's thread meets the event loop


class _Lost(Exception):
    """Raised when the connection went away while something waited on it."""


@dataclass(frozen=True, slots=True)
class _PubResult:
    ok: bool
    reason: str = ""
    lost: bool = False  # False with ok=False: the broker (or paho) refused this message


_LOST = _PubResult(False, "the connection was lost", lost=True)


class _Connection:
    """One paho client and one network connection. Never reused: reconnecting makes a new one.

    paho's network thread calls the ``_t_*`` callbacks; each only schedules its ``_on_*`` twin on
    the loop. Futures handed out here never carry exceptions (results say what happened), so none
    is ever left "unretrieved".
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        on_message: Callable[[_Connection, paho.MQTTMessage], None],
        on_lost: Callable[[_Connection], None],
        on_puback: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.client: paho.Client | None = None
        self.connack: asyncio.Future[tuple[ReasonCode, bool]] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self._publishes: dict[int, asyncio.Future[_PubResult]] = {}
        self._subscribes: dict[int, asyncio.Future[list[ReasonCode] | None]] = {}
        self._on_message_cb = on_message
        self._on_lost_cb = on_lost
        self._on_puback_cb = on_puback
        self._started = False

    # -- set-up (worker thread) ------------------------------------------------------------------
    def attach(self, client: paho.Client) -> None:
        self.client = client
        client.on_connect = self._t_connect
        client.on_disconnect = self._t_disconnect
        client.on_publish = self._t_publish
        client.on_subscribe = self._t_subscribe
        client.on_message = self._t_message

    def start_loop(self) -> None:
        assert self.client is not None
        self.client.loop_start()
        self._started = True

    # -- paho thread side: hand over to the loop, nothing else ----------------------------------------
    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _t_connect(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        self._call(self._on_connect, reason, bool(getattr(flags, "session_present", False)))

    def _t_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._call(self._on_disconnect, str(reason))

    def _t_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self._call(self._on_publish, mid, reason)

    def _t_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self._call(self._on_subscribe, mid, list(reasons))

    def _t_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self._call(self._on_message_cb, self, message)

    # -- loop side --------------------------------------------------------------------------------
    def _on_connect(self, reason: ReasonCode, session_present: bool) -> None:
        if not self.connack.done():
            self.connack.set_result((reason, session_present))

    def _on_disconnect(self, reason: str) -> None:
        self.mark_closed(reason)

    def mark_closed(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        for fut in self._publishes.values():
            if not fut.done():
                fut.set_result(_LOST)
        for sub in self._subscribes.values():
            if not sub.done():
                sub.set_result(None)
        self._publishes.clear()
        self._subscribes.clear()
        self._on_lost_cb(self)

    def _on_publish(self, mid: int, reason: ReasonCode) -> None:
        fut = self._publishes.pop(mid, None)
        if fut is not None and not fut.done():
            if reason.is_failure:
                fut.set_result(_PubResult(False, f"refused by the broker: {reason}"))
            else:
                fut.set_result(_PubResult(True))
            self._on_puback_cb()

    def _on_subscribe(self, mid: int, reasons: list[ReasonCode]) -> None:
        fut = self._subscribes.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reasons)

    @property
    def alive(self) -> bool:
        return (
            self.connack.done()
            and not self.connack.result()[0].is_failure
            and not self.closed.done()
        )

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[_PubResult]:
        """Publish; the future resolves when the broker acknowledged it (QoS 1) or it was sent
        (QoS 0), or says why not."""
        fut: asyncio.Future[_PubResult] = self._loop.create_future()
        if not self.alive or self.client is None:
            fut.set_result(_LOST)
            return fut
        try:
            info = self.client.publish(topic, payload, qos, retain, properties)
        except (ValueError, TypeError, UnicodeError) as exc:  # a topic paho cannot send
            fut.set_result(_PubResult(False, f"cannot publish to {topic!r}: {exc}"))
            return fut
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            fut.set_result(_LOST)
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_result(_PubResult(False, paho.error_string(info.rc)))
        elif qos == 0:
            fut.set_result(_PubResult(True))
        else:
            self._publishes[info.mid] = fut
        return fut

    async def subscribe(
        self, topics: list[tuple[str, int]], *, v5_options: SubscribeOptions | None
    ) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; raises :class:`_Lost` when the connection goes."""
        assert self.client is not None
        fut: asyncio.Future[list[ReasonCode] | None] = self._loop.create_future()
        if not self.alive:
            raise _Lost("not connected")
        if v5_options is not None:
            rc, mid = self.client.subscribe([(t, v5_options) for t, _ in topics])
        else:
            rc, mid = self.client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise _Lost(paho.error_string(rc))
        self._subscribes[mid] = fut
        done, _ = await asyncio.wait({fut}, timeout=_SUBACK_TIMEOUT)
        result = fut.result() if done else None
        if result is None:
            raise _Lost("no SUBACK from the broker")
        return result

    def ack(self, message: paho.MQTTMessage) -> None:
        """Acknowledge a command (manual acks); a no-op when its connection is gone."""
        if self.client is not None and message.qos > 0 and not self.closed.done():
            self.client.ack(message.mid, message.qos)

    async def close(self, *, clean: bool = False) -> None:
        """Disconnect (sending DISCONNECT when ``clean``), stop the network thread and close the
        sockets."""
        client = self.client
        if client is None:
            self.mark_closed("closed")
            return
        if clean or not self.closed.done():
            with contextlib.suppress(Exception):
                client.disconnect()
        if self._started:
            await asyncio.to_thread(client.loop_stop)
        _close_sockets(client)
        self.mark_closed("closed")


def _close_sockets(client: paho.Client) -> None:
    # paho closes its socket and wake-up socket pair in `_reset_sockets` (also run by its
    # `__del__`); call it now so no socket waits for the garbage collector (ResourceWarning).
    reset = getattr(client, "_reset_sockets", None)
    if reset is not None:
        with contextlib.suppress(Exception):
            reset()


# ------------------------------------------------------------------------------------------------
# Building and opening a connection


class _ConnectFailed(Exception):
    """Raised when one connection attempt failed; ``message`` is the one line logged for it."""

    def __init__(self, message: str, *, auth: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.auth = auth


_REFUSALS = {
    0x84: "the broker does not speak MQTT {version}; set mqtt.version",
    0x85: "client id {client_id!r} rejected; set mqtt.client_id",
    0x86: "bad username or password; check mqtt.username / password_file",
    # Mosquitto answers a wrong password with "not authorized".
    0x87: "not authorized (bad username or password, or the broker's ACL); check mqtt.username / password_file",
    0x88: "the broker is unavailable",
    0x89: "the broker is busy",
    0x8A: "this client is banned",
    0x8C: "bad authentication method; check mqtt.username / password_file",
    0x95: "the CONNECT packet is too large",
    0x97: "quota exceeded",
}


def _refusal(reason: ReasonCode, settings: MqttSettings, client_id: str) -> _ConnectFailed:
    text = _REFUSALS.get(reason.value)
    if text is None:
        text = f"{reason} (reason code {reason.value})"
    else:
        text = text.format(version=settings.version, client_id=client_id)
    return _ConnectFailed(
        f"MQTT broker {settings.host}:{settings.port} refused the connection: {text}",
        auth=reason.value in (0x86, 0x87, 0x8C),
    )


def _tls_context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


def _new_client(
    settings: MqttSettings,
    client_id: str,
    *,
    persistent: bool,
    will_topic: str | None,
    manual_ack: bool,
    inflight: int,
) -> paho.Client:
    """Build a paho client (blocking: reads the password file and the TLS files)."""
    v5 = settings.version == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=False,
        manual_ack=manual_ack,
    )
    client.connect_timeout = _CONNECT_TIMEOUT
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    if will_topic is not None:
        client.will_set(will_topic, b"offline", qos=1, retain=True)
    try:
        password = settings.read_password()
    except OSError as exc:
        raise _ConnectFailed(
            f"cannot read mqtt.password_file {settings.password_file}: {exc.strerror or exc}"
        ) from None
    if settings.username is not None or password is not None:
        client.username_pw_set(settings.username, password)
    if settings.tls is not None:
        try:
            client.tls_set_context(_tls_context(settings.tls))
        except (OSError, ssl.SSLError) as exc:
            raise _ConnectFailed(f"cannot load the TLS files of mqtt.tls: {exc}") from None
    return client


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated


def _connect_properties(
    settings: MqttSettings, *, persistent: bool, receive_maximum: int
) -> Properties | None:
    if settings.version != "5":
        return None
    props = _properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.session_expiry if persistent else 0
    props.ReceiveMaximum = receive_maximum
    # Payloads a little over max_payload still arrive (and get a `payload_too_large` reply);
    # the broker drops anything larger than this instead of making a small device buffer it.
    props.MaximumPacketSize = max(16 * settings.max_payload, 1 << 20)
    return props


async def _open(
    settings: MqttSettings,
    client_id: str,
    *,
    persistent: bool,
    will_topic: str | None,
    manual_ack: bool,
    inflight: int,
    receive_maximum: int,
    on_message: Callable[[_Connection, paho.MQTTMessage], None],
    on_lost: Callable[[_Connection], None],
    on_puback: Callable[[], None],
) -> tuple[_Connection, bool]:
    """Connect once; returns the live connection and the broker's session-present flag, or raises
    :class:`_ConnectFailed` with the line to log."""
    loop = asyncio.get_running_loop()
    conn = _Connection(loop, on_message=on_message, on_lost=on_lost, on_puback=on_puback)
    where = f"{settings.host}:{settings.port}"

    def blocking() -> None:
        client = _new_client(
            settings,
            client_id,
            persistent=persistent,
            will_topic=will_topic,
            manual_ack=manual_ack,
            inflight=inflight,
        )
        conn.attach(client)
        if settings.version == "5":
            client.connect(
                settings.host,
                settings.port,
                settings.keepalive,
                clean_start=not persistent,
                properties=_connect_properties(
                    settings, persistent=persistent, receive_maximum=receive_maximum
                ),
            )
        else:  # 3.1.1: persistence is the client's clean_session flag
            client.connect(settings.host, settings.port, settings.keepalive)
        _no_delay(client)
        conn.start_loop()

    work = loop.run_in_executor(None, blocking)
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        # The worker thread cannot be stopped: let it finish, then close what it opened.
        await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # retrieved: it no longer matters
        await conn.close()
        raise
    except _ConnectFailed:
        await conn.close()
        raise
    except ssl.SSLCertVerificationError as exc:
        await conn.close()
        raise _ConnectFailed(
            f"TLS handshake with the MQTT broker {where} failed: {exc.verify_message}; check "
            "mqtt.tls.ca_file and that mqtt.host is a name the broker's certificate carries"
        ) from None
    except ssl.SSLError as exc:
        await conn.close()
        raise _ConnectFailed(f"TLS handshake with the MQTT broker {where} failed: {exc}") from None
    except OSError as exc:
        await conn.close()
        why = exc.strerror or str(exc) or type(exc).__name__
        raise _ConnectFailed(f"cannot reach the MQTT broker {where}: {why}") from None
    except Exception as exc:
        await conn.close()
        raise _ConnectFailed(
            f"cannot connect to the MQTT broker {where}: {type(exc).__name__}: {exc}"
        ) from None

    waiters: set[asyncio.Future[Any]] = {conn.connack, conn.closed}
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        await conn.close()
        raise
    if conn.connack.done():
        reason, session_present = conn.connack.result()
        if reason.is_failure:
            await conn.close()
            raise _refusal(reason, settings, client_id)
        if not conn.closed.done():
            return conn, session_present
    await conn.close()
    if not done:
        raise _ConnectFailed(
            f"no answer (CONNACK) from the MQTT broker {where} within {_CONNECT_TIMEOUT:.0f} s"
        )
    raise _ConnectFailed(
        f"the MQTT broker {where} closed the connection before accepting it ({conn.closed.result()}); "
        "check mqtt.tls and mqtt.port"
    )


def _no_delay(client: paho.Client) -> None:
    # paho leaves Nagle's algorithm on: a small packet sent right after another (a PUBACK, then
    # the next event) then waits for the peer's delayed ACK, ~40 ms a hop. Small, latency-bound
    # packets are all MQTT sends here.
    sock = client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _backoff(settings: MqttSettings, failures: int) -> float:
    """Capped exponential backoff with jitter: uniformly in [base/2, base] for
    ``base = min(reconnect_max, reconnect_min * 2**(failures-1))``. Each gap is at least as long
    as the one before until the cap, and many devices restarting together do not reconnect in step."""
    exponent = min(max(failures - 1, 0), 62)
    base = min(settings.reconnect_max, settings.reconnect_min * math.pow(2, exponent))
    return base * random.uniform(0.5, 1.0)


def _dumps(obj: Any) -> bytes:
    # ensure_ascii (the default): a lone surrogate read from hostile input cannot break encoding.
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _snapshot(payload: dict[str, Any]) -> dict[str, Any]:
    """The retained state snapshot derived from one event."""
    return {
        "workflow_id": payload.get("workflow_id"),
        "workflow_type": payload.get("workflow_type"),
        "status": payload.get("status"),
        "current_step": payload.get("step"),
        "error": payload.get("error"),
        "updated_at": payload.get("at"),
        "seq": payload.get("seq"),
    }


# ------------------------------------------------------------------------------------------------
# The link


class MqttLink:
    """Connects the agent to an MQTT broker (DESIGN §8); ``await link.run()`` until cancelled.

    ``handler`` is :meth:`Control.handle_raw`. Workflows never wait for the broker: they write to
    the store's outbox, which this link drains whenever it is connected.
    """

    def __init__(
        self,
        *,
        settings: MqttSettings,
        device_id: str,
        store: SQLiteStore,
        handler: Handler,
        max_concurrent_commands: int = 16,
        outbox_window: int = 100,
        trim_interval: float = 5.0,
    ) -> None:
        if not _topic_safe(device_id):
            raise ValueError(
                f"The device id {device_id!r} cannot be a topic level: it must be non-empty and "
                "contain no '/', '+', '#' or NUL."
            )
        if max_concurrent_commands < 1 or outbox_window < 1:
            raise ValueError("max_concurrent_commands and outbox_window must be at least 1.")
        self.settings = settings
        self.device_id = device_id
        self.store = store
        self.handler = handler
        self.client_id = settings.client_id or f"edgesaga-{device_id}"
        self.topics = Topics(settings.topic_prefix, device_id)
        self._max_commands = max_concurrent_commands
        self._window = outbox_window
        self._trim_interval = trim_interval
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()  # the drainer has something to do
        self._outbox_grew = asyncio.Event()  # for the cap check
        self._incoming: asyncio.Queue[tuple[_Connection, paho.MQTTMessage]] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_concurrent_commands)
        self._to_clear: set[str] = set()  # pruned workflows whose state topic is still to clear
        # Pruned workflow -> the outbox's highest seq when it was pruned. Its events up to there
        # may still wait in the outbox: publish them, but not their snapshots (that would bring
        # a cleared state topic back, stale forever). A new instance reusing the id only has
        # later seqs.
        self._pruned: dict[str, int] = {}
        self._task: asyncio.Task[Any] | None = None
        self._qos0_dropped = 0
        #: Connection attempts and successful connections so far (status, tests).
        self.attempts = 0
        self.connects = 0
        #: The last connection failure, as logged; None once connected.
        self.last_error: str | None = None
        store.add_outbox_listener(self._on_outbox)

    # -- public state ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while connected to the broker and subscribed to the command topic."""
        return self._connected.is_set()

    @property
    def connected_event(self) -> asyncio.Event:
        """Set while connected (wait on it); cleared when the connection is lost."""
        return self._connected

    # -- running -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled: connect, reconnect with backoff, serve commands, drain the outbox.

        On cancel it publishes ``offline`` (retained), disconnects cleanly and re-raises."""
        if self._task is not None:
            raise RuntimeError("MqttLink.run() is already running.")
        self._task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._maintain_connection(), name="mqtt-connection")
                tg.create_task(self._receive(tg), name="mqtt-receiver")
                tg.create_task(self._drain_forever(), name="mqtt-outbox-drainer")
                tg.create_task(self._bound_outbox(), name="mqtt-outbox-cap")
        finally:
            self._task = None
            await self._goodbye()

    async def _goodbye(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        if conn is None:
            return
        if conn.alive:
            fut = conn.publish(self.topics.availability, b"offline", qos=1, retain=True)
            await asyncio.wait({fut}, timeout=_OFFLINE_TIMEOUT)
            log.info("published offline; disconnecting from the MQTT broker")
        await conn.close(clean=True)

    async def _maintain_connection(self) -> None:
        s = self.settings
        failures = 0
        while True:
            self.attempts += 1
            try:
                conn, session_present = await _open(
                    s,
                    self.client_id,
                    persistent=True,
                    will_topic=self.topics.availability,
                    manual_ack=True,
                    inflight=2 * self._window + 20,
                    receive_maximum=2 * self._max_commands,
                    on_message=self._on_message,
                    on_lost=self._on_lost,
                    on_puback=self._wake.set,
                )
            except _ConnectFailed as err:
                failures += 1
                delay = _backoff(s, failures)
                self.last_error = err.message
                (log.error if err.auth else log.warning)(
                    "%s; retrying in %.1f s (attempt %d)", err.message, delay, self.attempts
                )
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug here must not end the link
                failures += 1
                delay = _backoff(s, failures)
                log.exception(
                    "MQTT connection attempt failed unexpectedly (%s); retrying in %.1f s",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.last_error = None
            self._conn = conn
            try:
                await self._session_started(conn, session_present)
            except _Lost as exc:
                if not conn.closed.done():
                    log.warning(
                        "the MQTT broker did not confirm the subscription (%s); reconnecting", exc
                    )
                    await conn.close()
            except Exception:  # a bug here must not end the link
                log.exception("setting up the MQTT session failed; reconnecting")
                await conn.close()
            # shield: cancelling this task must not cancel the future (the goodbye still needs it).
            reason = await asyncio.shield(conn.closed)
            if self._conn is conn:
                self._conn = None
            await conn.close()
            delay = _backoff(s, 1)
            log.warning(
                "lost the connection to the MQTT broker %s:%d (%s); reconnecting in %.1f s",
                s.host,
                s.port,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session_started(self, conn: _Connection, session_present: bool) -> None:
        s = self.settings
        self.connects += 1
        log.info(
            "connected to the MQTT broker %s:%d as %s (MQTT %s, %s session)",
            s.host,
            s.port,
            self.client_id,
            s.version,
            "resumed" if session_present else "new",
        )
        conn.publish(self.topics.availability, b"online", qos=1, retain=True)
        options = (
            SubscribeOptions(
                qos=1,
                # The retain flag as published: a command sent with it is refused (see _serve).
                retainAsPublished=True,
                retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND,
            )
            if s.version == "5"
            else None
        )
        codes = await conn.subscribe([(self.topics.commands, 1)], v5_options=options)
        if any(c.is_failure for c in codes):
            log.error(
                "the MQTT broker refused the subscription to %s (%s): commands will not arrive; "
                "check the broker's ACL for this user",
                self.topics.commands,
                ", ".join(str(c) for c in codes),
            )
        if conn.alive:
            self._connected.set()
            self._wake.set()
            if self._to_clear:
                self._publish_clears(conn)

    def _on_lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._connected.clear()
        self._wake.set()

    def _on_outbox(self) -> None:
        self._wake.set()
        self._outbox_grew.set()

    # -- commands ----------------------------------------------------------------------------------
    def _on_message(self, conn: _Connection, message: paho.MQTTMessage) -> None:
        if message.qos == 0 and self._incoming.qsize() >= _MAX_QOS0_BACKLOG:
            self._qos0_dropped += 1
            if self._qos0_dropped in (1, 10, 100) or self._qos0_dropped % 1000 == 0:
                log.warning("command flood: %d QoS 0 commands dropped so far", self._qos0_dropped)
            return
        self._incoming.put_nowait((conn, message))

    async def _receive(self, tg: asyncio.TaskGroup) -> None:
        while True:
            conn, message = await self._incoming.get()
            await self._slots.acquire()  # bounded: at most max_concurrent_commands in flight
            try:
                name = message.topic.rpartition("/")[2]
            except UnicodeDecodeError:
                name = "?"
            tg.create_task(self._command(conn, message), name=f"mqtt-command:{name[:40]}")

    async def _command(self, conn: _Connection, message: paho.MQTTMessage) -> None:
        try:
            await self._serve(conn, message)
        except Exception:
            log.exception("unexpected failure while serving an MQTT command; it was acknowledged")
            conn.ack(message)
        finally:
            self._slots.release()

    async def _serve(self, conn: _Connection, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            conn.ack(message)
            return
        name = (
            topic[len(self.topics.command_base) :]
            if topic.startswith(self.topics.command_base)
            else ""
        )
        props = message.properties if self.settings.version == "5" else None
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload = bytes(message.payload)
        if response_topic is not None:
            problem = reply_refusal(response_topic, self.settings)
            if problem is not None:
                log.warning(
                    "refused a %s command: its MQTT 5 response topic %.100r %s; nothing was done",
                    name,
                    response_topic,
                    problem,
                )
                conn.ack(message)
                return
        # Checked before the command runs: a command whose reply cannot be sent is not carried out.
        refusal: str | None = None
        body: dict[str, Any] | None = None
        if message.retain:
            # Replayed to a new subscription (MQTT 3.1.1), or published live with the flag (seen
            # with MQTT 5's retain-as-published); either way it would run again and again.
            refusal = (
                f"Commands must be published without the retain flag (a retained command runs "
                f"again for every new subscriber); nothing was done. Clear it with an empty "
                f"retained message on {topic[:300]}."
            )
            body = _peek_command(payload, self.settings.max_payload)
        else:
            body = _peek_command(payload, self.settings.max_payload)
            reply_to = body.get("reply_to") if body is not None else None
            if isinstance(reply_to, str):
                problem = reply_refusal(reply_to, self.settings)
                if problem is not None:
                    refusal = f"The reply_to {reply_to[:100]!r} {problem}; nothing was done."
        if refusal is not None:
            rid = _request_id_of(body)
            log.warning("refused a %s command (request %s): %s", name, rid, refusal)
            if response_topic is None:
                conn.ack(message)
                return
            reply = error_reply(rid, "invalid_command", refusal)
            await self._reply(conn, message, response_topic, correlation, reply)
            return
        try:
            reply, reply_to = await self.handler(name, payload)
        except Exception:
            log.exception("the command handler failed on a %s command", name)
            reply, reply_to = (
                error_reply(
                    None, "internal_error", "The agent failed to handle this command; see its log."
                ),
                None,
            )
        target = response_topic or reply_to
        rid = reply.get("request_id")
        if not target:
            error = reply.get("error") or {}
            log.info(
                "%s command (request %s) has no reply address; result: %s",
                name,
                rid,
                "ok" if reply.get("ok") else error.get("code"),
            )
            conn.ack(message)
            return
        if response_topic is None and (problem := reply_refusal(target, self.settings)):
            # Not reached for a reply_to read above; kept so no path replies to such a topic.
            log.warning(
                "refused to send the reply to request %s to %.100r: it %s", rid, target, problem
            )
            conn.ack(message)
            return
        await self._reply(conn, message, target, correlation if response_topic else None, reply)

    async def _reply(
        self,
        conn: _Connection,
        message: paho.MQTTMessage,
        target: str,
        correlation: bytes | None,
        reply: dict[str, Any],
    ) -> None:
        """Publish ``reply`` to ``target``; acknowledge the command once the broker has it (or
        refused it), so a reply lost with the connection brings the command again."""
        rid = reply.get("request_id")
        properties: Properties | None = None
        if correlation is not None:
            properties = _properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        fut = conn.publish(target, _dumps(reply), qos=1, properties=properties)
        done, _ = await asyncio.wait({fut}, timeout=_REPLY_TIMEOUT)
        result = fut.result() if done else _PubResult(False, "no PUBACK in time", lost=True)
        if result.ok or not result.lost:
            if not result.ok:
                log.warning(
                    "could not send the reply to request %s to %r: %s", rid, target, result.reason
                )
            conn.ack(message)
        else:
            # Not acknowledged: the broker sends the command again after reconnecting, and the
            # repeat gets the stored reply.
            log.info(
                "reply to request %s not sent (%s); the command will be redelivered",
                rid,
                result.reason,
            )

    # -- outbox ------------------------------------------------------------------------------------
    async def _drain_forever(self) -> None:
        while True:
            await self._connected.wait()
            conn = self._conn
            if conn is None or not conn.alive:
                await asyncio.sleep(0.05)  # the loss is being handled
                continue
            try:
                await self._drain(conn)
            except Exception:
                log.exception("the outbox drainer failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _drain(self, conn: _Connection) -> None:
        """Publish the outbox in seq order over ``conn`` until it is lost; delete each item only
        after the broker acknowledged every message made from it."""
        cursor = 0  # the last seq published on this connection
        inflight: deque[tuple[OutboxItem, list[asyncio.Future[_PubResult]]]] = deque()
        while conn.alive:
            self._wake.clear()
            acked: list[int] = []
            while inflight and all(f.done() for f in inflight[0][1]):
                item, futures = inflight.popleft()
                results = [f.result() for f in futures]
                if any(r.lost for r in results):
                    return  # resume from the first unacknowledged item after reconnecting
                for r in results:
                    if not r.ok:
                        log.error(
                            "outbox item %d (%s) was not published: %s; dropping it",
                            item.seq,
                            item.kind,
                            r.reason,
                        )
                acked.append(item.seq)
            if acked:
                await self.store.outbox_ack(acked)
            room = self._window - len(inflight)
            if room > 0:
                items = await self.store.outbox_pending(limit=room, after_seq=cursor)
                if not conn.alive:
                    return
                for item in items:
                    inflight.append((item, self._publish_item(conn, item)))
                    cursor = item.seq
                if items:
                    continue
                if not inflight:
                    # Everything is published, events of pruned workflows included.
                    self._pruned.clear()
            await self._wake.wait()

    def _publish_item(
        self, conn: _Connection, item: OutboxItem
    ) -> list[asyncio.Future[_PubResult]]:
        payload = item.payload
        if item.kind == "alert":
            return [conn.publish(self.topics.alerts, _dumps(payload), qos=1)]
        futures = [conn.publish(self.topics.events, _dumps(payload), qos=1)]
        wid = item.workflow_id or payload.get("workflow_id")
        if isinstance(wid, str) and item.seq <= self._pruned.get(wid, 0):
            return futures  # an event of a pruned workflow: no snapshot
        if isinstance(wid, str) and _topic_safe(wid):
            futures.append(
                conn.publish(self.topics.state(wid), _dumps(_snapshot(payload)), qos=1, retain=True)
            )
        return futures

    async def _bound_outbox(self) -> None:
        cap = self.settings.outbox_cap
        while True:
            await self._outbox_grew.wait()
            self._outbox_grew.clear()
            try:
                await self._trim(cap)
            except Exception:
                log.exception("could not check the outbox size")
            await asyncio.sleep(self._trim_interval)

    async def _trim(self, cap: int) -> int:
        if await self.store.outbox_count() <= cap:
            return 0
        # Trim one below the cap: the overflow alert takes the last place.
        dropped = await self.store.outbox_trim(max(cap - 1, 0))
        if dropped:
            message = (
                f"The outbox of unpublished events exceeded its cap of {cap} (mqtt.outbox_cap) while "
                f"the broker was unreachable; the {dropped} oldest were dropped, events of finished "
                "workflows first. The workflows themselves are intact: `edgesaga get <id>` shows them."
            )
            log.warning(message)
            await self.store.add_alert(
                {
                    "seq": None,
                    "at": iso(time.time()),
                    "alert": "outbox_overflow",
                    "workflow_id": None,
                    "dropped": dropped,
                    "cap": cap,
                    "message": message,
                }
            )
        return dropped

    async def publish_alert(self, payload: dict[str, Any]) -> bool:
        """Publish an alert on ``alerts`` now, directly (QoS 1), not through the outbox: for news
        the outbox cannot carry, such as a full disk. True once the broker acknowledged it; False
        when not connected or not acknowledged within a few seconds."""
        conn = self._conn
        if conn is None or not conn.alive:
            return False
        fut = conn.publish(self.topics.alerts, _dumps(payload), qos=1)
        done, _ = await asyncio.wait({fut}, timeout=_REPLY_TIMEOUT)
        return bool(done) and fut.result().ok

    # -- retention ---------------------------------------------------------------------------------
    async def clear_state(self, workflow_ids: Iterable[str]) -> int:
        """Clear the retained state topics of pruned workflows (empty retained payloads).

        Returns how many the broker acknowledged now; the others are cleared after the next
        (re)connect. Events of these workflows still in the outbox are published later without
        their snapshots, so a cleared topic stays cleared."""
        ids = [w for w in workflow_ids if _topic_safe(w)]

        def last_seq(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])

        # The store has no public "last seq"; its read() runs this on the store thread.
        mark = await self.store.read(last_seq)
        self._to_clear.update(ids)
        for wid in ids:
            self._pruned[wid] = max(mark, self._pruned.get(wid, 0))
        conn = self._conn
        if conn is None or not conn.alive or not self._to_clear:
            return 0
        futures = self._publish_clears(conn)
        results = await asyncio.gather(*futures)
        return sum(1 for r in results if r.ok)

    def _publish_clears(self, conn: _Connection) -> list[asyncio.Future[_PubResult]]:
        futures = []
        for wid in sorted(self._to_clear):
            fut = conn.publish(self.topics.state(wid), b"", qos=1, retain=True)
            fut.add_done_callback(functools.partial(self._cleared, wid))
            futures.append(fut)
        return futures

    def _cleared(self, workflow_id: str, fut: asyncio.Future[_PubResult]) -> None:
        if fut.result().ok:
            self._to_clear.discard(workflow_id)


# ------------------------------------------------------------------------------------------------
# edgesaga watch


def _device_of(topic: str, prefix: str) -> str:
    rest = topic[len(prefix) + 1 :] if topic.startswith(prefix + "/") else topic
    return rest.split("/", 1)[0]


def format_event(topic: str, payload: bytes, prefix: str) -> str:
    """One line for ``edgesaga watch``:
    ``<at> <device> <workflow_id[:8]> <event> <step> attempt=<n> <status> <error>``; alerts read
    ``<at> <device> <workflow_id[:8]> ALERT <alert> <step> <message>``."""
    device = _device_of(topic, prefix)
    try:
        p = json.loads(payload)
        if not isinstance(p, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        return f"- {device} - (unreadable message on {topic})"
    wid = str(p.get("workflow_id") or "-")[:8]
    step = p.get("step") or "-"
    if topic.endswith("/alerts"):
        return f"{p.get('at')} {device} {wid} ALERT {p.get('alert')} {step} {p.get('message') or ''}".rstrip()
    attempt = p.get("attempt")
    return (
        f"{p.get('at')} {device} {wid} {p.get('event')} {step} "
        f"attempt={attempt if attempt is not None else '-'} {p.get('status')} {p.get('error') or ''}"
    ).rstrip()


async def watch(settings: MqttSettings, device: str = "+", out: TextIO = sys.stdout) -> None:
    """Print one line per event and alert of ``device`` (``+``: every device) until cancelled."""
    if device != "+" and not _topic_safe(device):
        raise ValueError(f"{device!r} is not a device id (or '+' for every device).")
    topics = Topics(settings.topic_prefix, device)
    client_id = f"edgesaga-watch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lines: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def on_message(_conn: _Connection, message: paho.MQTTMessage) -> None:
        lines.put_nowait((message.topic, bytes(message.payload)))

    failures = 0
    while True:
        try:
            conn, _ = await _open(
                settings,
                client_id,
                persistent=False,
                will_topic=None,
                manual_ack=False,
                inflight=20,
                receive_maximum=100,
                on_message=on_message,
                on_lost=lambda _c: None,
                on_puback=lambda: None,
            )
        except _ConnectFailed as err:
            failures += 1
            delay = _backoff(settings, failures)
            log.warning("%s; retrying in %.1f s", err.message, delay)
            await asyncio.sleep(delay)
            continue
        failures = 0
        try:
            await conn.subscribe([(topics.events, 1), (topics.alerts, 1)], v5_options=None)
            closed = conn.closed
            while not closed.done():
                getter = asyncio.ensure_future(lines.get())
                waiters: set[asyncio.Future[Any]] = {getter, closed}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if getter.done() and not getter.cancelled():
                    topic, payload = getter.result()
                    out.write(format_event(topic, payload, settings.topic_prefix) + "\n")
                while not lines.empty():
                    topic, payload = lines.get_nowait()
                    out.write(format_event(topic, payload, settings.topic_prefix) + "\n")
                out.flush()
            log.warning(
                "lost the connection to the MQTT broker (%s); reconnecting", closed.result()
            )
        except _Lost:
            pass
        finally:
            await conn.close(clean=True)
        await asyncio.sleep(_backoff(settings, 1))
