"""The MQTT transport: building a paho client (TLS, credentials), opening one connection,
the bridge between paho's thread and the event loop, and the reconnect backoff.

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

Threads meet the loop in one place, :class:`Connection`: paho's network thread (``loop_start``)
runs its callbacks, and each callback only hands its arguments to the event loop with
``call_soon_threadsafe``. Everything else here runs on the loop. The blocking parts of connecting
(DNS, TCP, TLS handshake, reading the password file) run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent._config import MqttSettings, TlsSettings

log = logging.getLogger("edgesaga.mqtt")

_CONNECT_TIMEOUT = 10.0  # seconds for TCP + TLS + CONNACK
_SUBACK_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------------
# One connection: the only place paho's thread meets the event loop


class Lost(Exception):
    """Raised when the connection went away while something waited on it."""


@dataclass(frozen=True, slots=True)
class PubResult:
    ok: bool
    reason: str = ""
    lost: bool = False  # False with ok=False: the broker (or paho) refused this message


LOST = PubResult(False, "the connection was lost", lost=True)


class Connection:
    """One paho client and one network connection. Never reused: reconnecting makes a new one.

    paho's network thread calls the ``_t_*`` callbacks; each only schedules its ``_on_*`` twin on
    the loop. Futures handed out here never carry exceptions (results say what happened), so none
    is ever left "unretrieved".
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        on_message: Callable[[Connection, paho.MQTTMessage], None],
        on_lost: Callable[[Connection], None],
        on_puback: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.client: paho.Client | None = None
        self.connack: asyncio.Future[tuple[ReasonCode, bool]] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self._publishes: dict[int, asyncio.Future[PubResult]] = {}
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
                fut.set_result(LOST)
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
                fut.set_result(PubResult(False, f"refused by the broker: {reason}"))
            else:
                fut.set_result(PubResult(True))
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
    ) -> asyncio.Future[PubResult]:
        """Publish; the future resolves when the broker acknowledged it (QoS 1) or it was sent
        (QoS 0), or says why not."""
        fut: asyncio.Future[PubResult] = self._loop.create_future()
        if not self.alive or self.client is None:
            fut.set_result(LOST)
            return fut
        try:
            info = self.client.publish(topic, payload, qos, retain, properties)
        except (ValueError, TypeError, UnicodeError) as exc:  # a topic paho cannot send
            fut.set_result(PubResult(False, f"cannot publish to {topic!r}: {exc}"))
            return fut
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            fut.set_result(LOST)
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_result(PubResult(False, paho.error_string(info.rc)))
        elif qos == 0:
            fut.set_result(PubResult(True))
        else:
            self._publishes[info.mid] = fut
        return fut

    async def subscribe(
        self, topics: list[tuple[str, int]], *, v5_options: SubscribeOptions | None
    ) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; raises :class:`Lost` when the connection goes."""
        assert self.client is not None
        fut: asyncio.Future[list[ReasonCode] | None] = self._loop.create_future()
        if not self.alive:
            raise Lost("not connected")
        if v5_options is not None:
            rc, mid = self.client.subscribe([(t, v5_options) for t, _ in topics])
        else:
            rc, mid = self.client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise Lost(paho.error_string(rc))
        self._subscribes[mid] = fut
        done, _ = await asyncio.wait({fut}, timeout=_SUBACK_TIMEOUT)
        result = fut.result() if done else None
        if result is None:
            raise Lost("no SUBACK from the broker")
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


class ConnectFailed(Exception):
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


def _refusal(reason: ReasonCode, settings: MqttSettings, client_id: str) -> ConnectFailed:
    text = _REFUSALS.get(reason.value)
    if text is None:
        text = f"{reason} (reason code {reason.value})"
    else:
        text = text.format(version=settings.version, client_id=client_id)
    return ConnectFailed(
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


class ClientOptions(NamedTuple):
    """How a connection's client is set up: the link's is a persistent session with a last will
    and manual acks; `edgesaga watch`'s is a throw-away one."""

    persistent: bool
    will_topic: str | None
    manual_ack: bool
    inflight: int


def _new_client(settings: MqttSettings, client_id: str, options: ClientOptions) -> paho.Client:
    """Build a paho client (blocking: reads the password file and the TLS files)."""
    persistent, will_topic, manual_ack, inflight = options
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
        raise ConnectFailed(
            f"cannot read mqtt.password_file {settings.password_file}: {exc.strerror or exc}"
        ) from None
    if settings.username is not None or password is not None:
        client.username_pw_set(settings.username, password)
    if settings.tls is not None:
        try:
            client.tls_set_context(_tls_context(settings.tls))
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot load the TLS files of mqtt.tls: {exc}") from None
    return client


def mqtt_properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated


def _connect_properties(
    settings: MqttSettings, *, persistent: bool, receive_maximum: int
) -> Properties | None:
    if settings.version != "5":
        return None
    props = mqtt_properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.session_expiry if persistent else 0
    props.ReceiveMaximum = receive_maximum
    # Payloads a little over max_payload still arrive (and get a `payload_too_large` reply);
    # the broker drops anything larger than this instead of making a small device buffer it.
    props.MaximumPacketSize = max(16 * settings.max_payload, 1 << 20)
    return props


async def open_connection(
    settings: MqttSettings,
    client_id: str,
    options: ClientOptions,
    *,
    receive_maximum: int,
    on_message: Callable[[Connection, paho.MQTTMessage], None],
    on_lost: Callable[[Connection], None],
    on_puback: Callable[[], None],
) -> tuple[Connection, bool]:
    """Connect once; returns the live connection and the broker's session-present flag, or raises
    :class:`ConnectFailed` with the line to log."""
    loop = asyncio.get_running_loop()
    conn = Connection(loop, on_message=on_message, on_lost=on_lost, on_puback=on_puback)
    where = f"{settings.host}:{settings.port}"

    def blocking() -> None:
        client = _new_client(settings, client_id, options)
        conn.attach(client)
        if settings.version == "5":
            client.connect(
                settings.host,
                settings.port,
                settings.keepalive,
                clean_start=not options.persistent,
                properties=_connect_properties(
                    settings, persistent=options.persistent, receive_maximum=receive_maximum
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
    except Exception as exc:
        await conn.close()
        raise _connect_error(exc, where) from None
    try:
        return conn, await _accepted(conn, settings, client_id, where)
    except BaseException:
        await conn.close()
        raise


def _connect_error(exc: Exception, where: str) -> ConnectFailed:
    """The one line to log for what the blocking part of connecting raised."""
    if isinstance(exc, ConnectFailed):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectFailed(
            f"TLS handshake with the MQTT broker {where} failed: {exc.verify_message}; check "
            "mqtt.tls.ca_file and that mqtt.host is a name the broker's certificate carries"
        )
    if isinstance(exc, ssl.SSLError):
        return ConnectFailed(f"TLS handshake with the MQTT broker {where} failed: {exc}")
    if isinstance(exc, OSError):
        why = exc.strerror or str(exc) or type(exc).__name__
        return ConnectFailed(f"cannot reach the MQTT broker {where}: {why}")
    return ConnectFailed(f"cannot connect to the MQTT broker {where}: {type(exc).__name__}: {exc}")


async def _accepted(conn: Connection, settings: MqttSettings, client_id: str, where: str) -> bool:
    """Wait for the broker's CONNACK; its session-present flag, or :class:`ConnectFailed` (the
    caller closes the connection then)."""
    waiters: set[asyncio.Future[Any]] = {conn.connack, conn.closed}
    done, _ = await asyncio.wait(
        waiters, timeout=_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if conn.connack.done():
        reason, session_present = conn.connack.result()
        if reason.is_failure:
            raise _refusal(reason, settings, client_id)
        if not conn.closed.done():
            return session_present
    if not done:
        raise ConnectFailed(
            f"no answer (CONNACK) from the MQTT broker {where} within {_CONNECT_TIMEOUT:.0f} s"
        )
    raise ConnectFailed(
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


def backoff(settings: MqttSettings, failures: int) -> float:
    """Capped exponential backoff with jitter: uniformly in [base/2, base] for
    ``base = min(reconnect_max, reconnect_min * 2**(failures-1))``. Each gap is at least as long
    as the one before until the cap, and many devices restarting together do not reconnect in step."""
    exponent = min(max(failures - 1, 0), 62)
    base = min(settings.reconnect_max, settings.reconnect_min * math.pow(2, exponent))
    return base * random.uniform(0.5, 1.0)
