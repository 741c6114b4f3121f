"""The MQTT link: commands in; replies, events, alerts and retained state out.

The connection under it (paho, TLS, the thread bridge, reconnect backoff) is
:mod:`agent._transport`'s; ``edgesaga watch`` is :mod:`agent._watch`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

# The settings models live with the rest of the agent config, which `edgesaga run` loads before
# READY; this module (and paho) are imported after READY. Re-exported here for existing imports.
from agent._config import MqttSettings as MqttSettings
from agent._config import TlsSettings as TlsSettings
from agent._messages import alert, dumps, error_reply, state_snapshot
from agent._store import OutboxItem, SQLiteStore, iso
from agent._transport import (
    ClientOptions,
    ConnectFailed,
    Connection,
    Lost,
    PubResult,
    backoff,
    mqtt_properties,
    open_connection,
)

log = logging.getLogger("edgesaga.mqtt")

#: ``handler(command_name, payload) -> (reply, reply_to)``, i.e. :meth:`Control.handle_raw`.
Handler = Callable[[str, bytes], Awaitable[tuple[dict[str, Any], str | None]]]

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


def _dumps(obj: Any) -> bytes:
    return dumps(obj).encode()  # ASCII: a lone surrogate from hostile input cannot break it


# ------------------------------------------------------------------------------------------------
# The link


class MqttLink:
    """Connects the agent to an MQTT broker; ``await link.run()`` until cancelled.

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
        homeassistant: Any = None,
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
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()  # the drainer has something to do
        self._outbox_grew = asyncio.Event()  # for the cap check
        self._incoming: asyncio.Queue[tuple[Connection, paho.MQTTMessage]] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_concurrent_commands)
        self._to_clear: set[str] = set()  # pruned workflows whose state topic is still to clear
        # Pruned workflow -> the outbox's highest seq when it was pruned. Its events up to there
        # may still wait in the outbox: publish them, but not their snapshots (that would bring
        # a cleared state topic back, stale forever). A new instance reusing the id only has
        # later seqs.
        self._pruned: dict[str, int] = {}
        self._task: asyncio.Task[Any] | None = None
        self._qos0_dropped = 0
        #: Home Assistant discovery (:class:`agent._homeassistant.HomeAssistant`), or None.
        self.homeassistant = homeassistant
        self._ha_tasks: set[asyncio.Task[Any]] = set()
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
                if self.homeassistant is not None:
                    tg.create_task(self.homeassistant.run(), name="mqtt-homeassistant")
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
                conn, session_present = await open_connection(
                    s,
                    self.client_id,
                    ClientOptions(
                        persistent=True,
                        will_topic=self.topics.availability,
                        manual_ack=True,
                        inflight=2 * self._window + 20,
                    ),
                    receive_maximum=2 * self._max_commands,
                    on_message=self._on_message,
                    on_lost=self._on_lost,
                    on_puback=self._wake.set,
                )
            except ConnectFailed as err:
                failures += 1
                delay = backoff(s, failures)
                self.last_error = err.message
                (log.error if err.auth else log.warning)(
                    "%s; retrying in %.1f s (attempt %d)", err.message, delay, self.attempts
                )
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug here must not end the link
                failures += 1
                delay = backoff(s, failures)
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
            except Lost as exc:
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
            delay = backoff(s, 1)
            log.warning(
                "lost the connection to the MQTT broker %s:%d (%s); reconnecting in %.1f s",
                s.host,
                s.port,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session_started(self, conn: Connection, session_present: bool) -> None:
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
        filters = [self.topics.commands]
        if self.homeassistant is not None:
            filters.extend(self.homeassistant.filters())
        codes = await conn.subscribe([(f, 1) for f in filters], v5_options=options)
        if any(c.is_failure for c in codes):
            log.error(
                "the MQTT broker refused the subscription to %s (%s): commands will not arrive; "
                "check the broker's ACL for this user",
                ", ".join(filters),
                ", ".join(str(c) for c in codes),
            )
        if conn.alive:
            self._connected.set()
            self._wake.set()
            if self._to_clear:
                self._publish_clears(conn)
            if self.homeassistant is not None:
                self._ha_task(self.homeassistant.announce(self.publish_now), "announce")

    def _ha_task(self, work: Awaitable[Any], what: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("Home Assistant: %s failed", what)

        task = asyncio.get_running_loop().create_task(guarded(), name=f"homeassistant-{what}")
        self._ha_tasks.add(task)
        task.add_done_callback(self._ha_tasks.discard)

    def publish_now(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Publish ``payload`` on ``topic`` now (QoS 1), not through the outbox; False when not
        connected. For Home Assistant's discovery and entity states."""
        conn = self._conn
        if conn is None or not conn.alive:
            return False
        conn.publish(topic, payload, qos=1, retain=retain)
        return True

    def _on_lost(self, conn: Connection) -> None:
        if self._conn is conn:
            self._connected.clear()
        self._wake.set()

    def _on_outbox(self) -> None:
        self._wake.set()
        self._outbox_grew.set()

    # -- commands ----------------------------------------------------------------------------------
    def _on_message(self, conn: Connection, message: paho.MQTTMessage) -> None:
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

    async def _command(self, conn: Connection, message: paho.MQTTMessage) -> None:
        try:
            await self._serve(conn, message)
        except Exception:
            log.exception("unexpected failure while serving an MQTT command; it was acknowledged")
            conn.ack(message)
        finally:
            self._slots.release()

    async def _serve(self, conn: Connection, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            conn.ack(message)
            return
        ha = self.homeassistant
        if ha is not None and not topic.startswith(self.topics.command_base) and ha.owns(topic):
            await self._serve_homeassistant(conn, message, topic)
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
        body = _peek_command(payload, self.settings.max_payload)
        refusal = self._refusal(message, topic, body)
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

    async def _serve_homeassistant(
        self, conn: Connection, message: paho.MQTTMessage, topic: str
    ) -> None:
        """An entity command or Home Assistant's birth message: bounded like any command; a
        retained entity command is refused (it would run again for every new subscriber)."""
        ha = self.homeassistant
        payload = bytes(message.payload)
        try:
            if len(payload) > self.settings.max_payload:
                log.warning(
                    "refused a Home Assistant message on %.200s: %d bytes is more than "
                    "mqtt.max_payload (%d)",
                    topic,
                    len(payload),
                    self.settings.max_payload,
                )
            elif message.retain and topic != ha.birth:
                log.warning(
                    "refused a retained Home Assistant command on %.200s; publish it without "
                    "the retain flag",
                    topic,
                )
            else:
                await ha.handle(topic, payload)
        finally:
            conn.ack(message)

    def _refusal(
        self, message: paho.MQTTMessage, topic: str, body: dict[str, Any] | None
    ) -> str | None:
        """Why a command must not run, or None. Checked before it runs: a command whose reply
        cannot be sent is not carried out."""
        if message.retain:
            # Replayed to a new subscription (MQTT 3.1.1), or published live with the flag (seen
            # with MQTT 5's retain-as-published); either way it would run again and again.
            return (
                f"Commands must be published without the retain flag (a retained command runs "
                f"again for every new subscriber); nothing was done. Clear it with an empty "
                f"retained message on {topic[:300]}."
            )
        reply_to = body.get("reply_to") if body is not None else None
        if isinstance(reply_to, str):
            problem = reply_refusal(reply_to, self.settings)
            if problem is not None:
                return f"The reply_to {reply_to[:100]!r} {problem}; nothing was done."
        return None

    async def _reply(
        self,
        conn: Connection,
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
            properties = mqtt_properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        fut = conn.publish(target, _dumps(reply), qos=1, properties=properties)
        done, _ = await asyncio.wait({fut}, timeout=_REPLY_TIMEOUT)
        result = fut.result() if done else PubResult(False, "no PUBACK in time", lost=True)
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

    async def _drain(self, conn: Connection) -> None:
        """Publish the outbox in seq order over ``conn`` until it is lost; delete each item only
        after the broker acknowledged every message made from it."""
        cursor = 0  # the last seq published on this connection
        inflight: deque[tuple[OutboxItem, list[asyncio.Future[PubResult]]]] = deque()
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

    def _publish_item(self, conn: Connection, item: OutboxItem) -> list[asyncio.Future[PubResult]]:
        payload = item.payload
        if item.kind == "alert":
            return [conn.publish(self.topics.alerts, _dumps(payload), qos=1)]
        futures = [conn.publish(self.topics.events, _dumps(payload), qos=1)]
        if self.homeassistant is not None:
            try:
                changes = self.homeassistant.on_event(payload)
            except Exception:
                log.exception("Home Assistant: a sensor state could not be derived")
                changes = []
            futures.extend(conn.publish(t, p, qos=1, retain=True) for t, p in changes)
        wid = item.workflow_id or payload.get("workflow_id")
        if isinstance(wid, str) and item.seq <= self._pruned.get(wid, 0):
            return futures  # an event of a pruned workflow: no snapshot
        if isinstance(wid, str) and _topic_safe(wid):
            futures.append(
                conn.publish(
                    self.topics.state(wid), _dumps(state_snapshot(payload)), qos=1, retain=True
                )
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
            payload = alert(
                "outbox_overflow", message, at=iso(time.time()), dropped=dropped, cap=cap
            )
            await self.store.add_alert(dict(payload))
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
        mark = await self.store.outbox_last_seq()
        self._to_clear.update(ids)
        for wid in ids:
            self._pruned[wid] = max(mark, self._pruned.get(wid, 0))
        conn = self._conn
        if conn is None or not conn.alive or not self._to_clear:
            return 0
        futures = self._publish_clears(conn)
        results = await asyncio.gather(*futures)
        return sum(1 for r in results if r.ok)

    def _publish_clears(self, conn: Connection) -> list[asyncio.Future[PubResult]]:
        futures = []
        for wid in sorted(self._to_clear):
            fut = conn.publish(self.topics.state(wid), b"", qos=1, retain=True)
            fut.add_done_callback(functools.partial(self._cleared, wid))
            futures.append(fut)
        return futures

    def _cleared(self, workflow_id: str, fut: asyncio.Future[PubResult]) -> None:
        if fut.result().ok:
            self._to_clear.discard(workflow_id)
