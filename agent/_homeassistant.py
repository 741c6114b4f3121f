"""Home Assistant MQTT discovery (DESIGN §12): the agent as one device with buttons and sensors.

Per-component discovery topics, ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``
(retained), one per entity, each with ``unique_id``, the agent's ``device`` block and its
``availability`` topic. The entities' own topics are under ``<prefix>/<device>/ha/``; a command
there goes through the agent's one operator path (:meth:`Control.execute`), like an MQTT command.
What was announced last is kept in the store's ``meta`` table, so an entity that is no longer
configured gets an empty retained config (Home Assistant removes it) on the next start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent._config import HomeAssistantSettings
from agent._errors import AgentError
from agent._status import WorkflowStatus

log = logging.getLogger("edgesaga.homeassistant")

#: ``publish(topic, payload, retain)``: publishes now (QoS 1) when connected; False when not.
Publish = Callable[[str, bytes, bool], bool]

_META_KEY = "homeassistant_configs"
_POLL = 1.0  # seconds between two looks at the board's values
_STATS_EVERY = 10  # polls between two agent-sensor updates
_DAY = 24 * 3600.0
_MAX_PUBLISHED = 10_000  # discovery topics remembered in meta (bounded)


class HomeAssistantConfigError(AgentError, ValueError):
    """The homeassistant section names a workflow type the agent does not load."""


def _level(name: str) -> str:
    """``name`` as a discovery node or object id (letters, digits, ``_`` and ``-`` only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100] or "_"


def check_exposed(settings: HomeAssistantSettings, workflow_types: list[str]) -> None:
    """Raise :class:`HomeAssistantConfigError` when ``expose`` names a type that is not loaded."""
    missing = [t for t in settings.expose if t not in workflow_types]
    if missing:
        raise HomeAssistantConfigError(
            f"homeassistant.expose names {', '.join(missing)}, which is not a loaded workflow "
            f"type (loaded: {', '.join(workflow_types) or 'none'}); fix the name or remove it."
        )


async def read_published(store: Any) -> list[str]:
    """The discovery topics announced last time (from the store's ``meta`` table)."""

    def fn(conn: sqlite3.Connection) -> list[str]:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_KEY,)).fetchone()
        try:
            value = json.loads(row[0]) if row and row[0] else []
        except ValueError:
            return []
        return [t for t in value if isinstance(t, str)] if isinstance(value, list) else []

    result: list[str] = await store.query(fn)
    return result


async def write_published(store: Any, topics: list[str]) -> None:
    """Remember ``topics`` as the discovery topics announced now."""
    text = json.dumps(sorted(topics)[:_MAX_PUBLISHED])

    def fn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (_META_KEY, text),
        )

    await store.write(fn)


class HomeAssistant:
    """Discovery configs, entity states and entity commands for one agent."""

    def __init__(
        self,
        settings: HomeAssistantSettings,
        *,
        device_id: str,
        base: str,
        availability: str,
        builder: Any,
        store: Any,
        control: Any,
        board: Any = None,
        sw_version: str = "",
    ) -> None:
        self.settings = settings
        self.device_id = device_id
        self.node = _level(device_id)
        self.base = f"{base}/ha"
        self.availability = availability
        self.builder = builder
        self.store = store
        self.control = control
        self.board = board
        self.sw_version = sw_version
        self.birth = f"{settings.discovery_prefix}/status"
        self._latest: dict[str, dict[str, Any]] = {}  # exposed type -> its latest instance
        self._values: dict[str, Any] = {}  # device -> the value last published
        self._publish: Publish | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stale: list[str] | None = None  # read once per process: what the last run announced

    # -- topics ---------------------------------------------------------------------------------
    def filters(self) -> list[str]:
        """The subscriptions: entity commands and Home Assistant's birth message."""
        return [f"{self.base}/+/+/+/set", self.birth]

    def owns(self, topic: str) -> bool:
        return topic == self.birth or (topic.startswith(self.base + "/") and topic.endswith("/set"))

    def _topic(self, kind: str, name: str, leaf: str) -> str:
        return f"{self.base}/{kind}/{_level(name)}/{leaf}"

    def _config_topic(self, component: str, object_id: str) -> str:
        return f"{self.settings.discovery_prefix}/{component}/{self.node}/{object_id}/config"

    # -- discovery ------------------------------------------------------------------------------
    def _device(self) -> dict[str, Any]:
        return {
            "identifiers": [f"edgesaga_{self.node}"],
            "name": f"edgesaga {self.device_id}",
            "model": "edgesaga agent",
            "manufacturer": "edgesaga",
            "sw_version": self.sw_version,
        }

    def _entity(self, object_id: str, name: str, **fields: Any) -> dict[str, Any]:
        return {
            "name": name,
            "unique_id": f"edgesaga_{self.node}_{object_id}",
            "device": self._device(),
            "availability_topic": self.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            **fields,
        }

    def _human_input_types(self) -> list[str]:
        return [
            t
            for t in self.settings.expose
            if any(s.spec.type == "HUMAN_INPUT" for s in self.builder.definition(t).steps)
        ]

    def configs(self) -> dict[str, dict[str, Any]]:
        """Every discovery config by its topic."""
        out: dict[str, dict[str, Any]] = {}
        human = set(self._human_input_types())
        for wt in self.settings.expose:
            lv = _level(wt)
            out[self._config_topic("button", f"{lv}_start")] = self._entity(
                f"{lv}_start",
                f"Start {wt}",
                command_topic=self._topic("wf", wt, "start/set"),
                payload_press="PRESS",
            )
            state = self._topic("wf", wt, "state")
            out[self._config_topic("sensor", f"{lv}_status")] = self._entity(
                f"{lv}_status",
                f"{wt} status",
                state_topic=state,
                value_template="{{ value_json.status }}",
                json_attributes_topic=state,
            )
            for verb in ("approve", "reject") if wt in human else ():
                out[self._config_topic("button", f"{lv}_{verb}")] = self._entity(
                    f"{lv}_{verb}",
                    f"{verb.capitalize()} {wt}",
                    command_topic=self._topic("wf", wt, f"{verb}/set"),
                    payload_press="PRESS",
                )
        out.update(self._device_configs())
        for key, label in (
            ("active", "Workflows active"),
            ("paused", "Workflows paused"),
            ("failed_24h", "Workflows failed in the last 24 h"),
            ("outbox", "Outbox backlog"),
        ):
            out[self._config_topic("sensor", f"agent_{key}")] = self._entity(
                f"agent_{key}",
                label,
                state_topic=f"{self.base}/agent/stats/state",
                value_template=f"{{{{ value_json.{key} }}}}",
                state_class="measurement",
            )
        return out

    def _device_configs(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        board = self.board
        for name in board if board is not None else ():
            kind = board[name].kind
            lv = f"dev_{_level(name)}"
            state = self._topic("dev", name, "state")
            if kind in ("input", "button"):
                out[self._config_topic("binary_sensor", lv)] = self._entity(
                    lv, name, state_topic=state, payload_on="ON", payload_off="OFF"
                )
            elif kind == "output":
                out[self._config_topic("switch", lv)] = self._entity(
                    lv,
                    name,
                    state_topic=state,
                    command_topic=self._topic("dev", name, "switch/set"),
                    payload_on="ON",
                    payload_off="OFF",
                )
        return out

    async def announce(self, publish: Publish) -> int:
        """Publish every discovery config (retained), empty the ones announced last time that are
        no longer configured, then the current states. Returns how many configs went out."""
        self._publish = publish
        configs = self.configs()
        if self._stale is None:
            try:
                self._stale = [t for t in await read_published(self.store) if t not in configs]
                await write_published(self.store, list(configs))
            except Exception as exc:  # a full disk: announce anyway, remove next time
                log.warning("Home Assistant: cannot record the configs announced (%s)", exc)
                self._stale = []
        for topic in self._stale:
            if publish(topic, b"", True):
                log.info("Home Assistant: removed %s (no longer configured)", topic)
        self._stale = []
        sent = sum(1 for t, c in configs.items() if publish(t, json.dumps(c).encode(), True))
        for wt in self.settings.expose:
            await self._load_latest(wt)
            self._publish_latest(wt)
        self._values.clear()
        self._poll_board()
        await self.publish_stats()
        log.info("Home Assistant: %d discovery config(s) published", sent)
        return sent

    # -- states ---------------------------------------------------------------------------------
    async def _load_latest(self, wt: str) -> None:
        records, _ = await self.store.list_page(workflow_type=wt, limit=1)
        if records:
            rec = records[0]
            self._latest[wt] = dict(rec.summary())

    def _publish_latest(self, wt: str) -> None:
        latest = self._latest.get(wt) or {"status": "none", "workflow_id": None}
        if self._publish is not None:
            self._publish(self._topic("wf", wt, "state"), json.dumps(latest).encode(), True)

    def on_event(self, event: dict[str, Any]) -> list[tuple[str, bytes]]:
        """What an outbox event changes: the state of its type's sensor (retained)."""
        wt = event.get("workflow_type")
        if not isinstance(wt, str) or wt not in self.settings.expose:
            return []
        wid = event.get("workflow_id")
        latest = self._latest.get(wt)
        stale = latest is not None and latest.get("workflow_id") != wid
        if stale and event.get("event") != "workflow_started":
            return []  # an older instance's news: the sensor follows the latest one
        if latest is None or latest.get("workflow_id") != wid:
            latest = self._latest[wt] = {"workflow_id": wid, "created_at": event.get("at")}
        latest.update(
            workflow_type=wt,
            status=event.get("status"),
            current_step=event.get("step"),
            error=event.get("error"),
            updated_at=event.get("at"),
        )
        return [(self._topic("wf", wt, "state"), json.dumps(latest).encode())]

    def _poll_board(self) -> None:
        board, publish = self.board, self._publish
        if board is None or publish is None:
            return
        try:
            values = board.snapshot()
        except Exception:  # a closed board at shutdown
            return
        for name, value in values.items():
            if board[name].kind == "pwm" or self._values.get(name) == value:
                continue
            if publish(self._topic("dev", name, "state"), b"ON" if value else b"OFF", True):
                self._values[name] = value

    async def publish_stats(self) -> None:
        if self._publish is None:
            return
        counts = await self.store.count_by_status(["ACTIVE", "PAUSED", "COMPENSATING"])
        since = time.time() - _DAY
        failed: int = await self.store.query(
            lambda conn: conn.execute(
                "SELECT COUNT(*) FROM instances WHERE finished_at > ? AND status IN (?, ?)",
                (since, WorkflowStatus.FAILED.value, WorkflowStatus.COMPENSATION_FAILED.value),
            ).fetchone()[0]
        )
        stats = {
            "active": counts.get("ACTIVE", 0) + counts.get("COMPENSATING", 0),
            "paused": counts.get("PAUSED", 0),
            "failed_24h": failed,
            "outbox": await self.store.outbox_count(),
        }
        self._publish(f"{self.base}/agent/stats/state", json.dumps(stats).encode(), True)

    async def run(self) -> None:
        """Until cancelled: publish board values as they change and the agent sensors now and
        then (while connected)."""
        n = 0
        while True:
            await asyncio.sleep(_POLL)
            self._poll_board()
            n += 1
            if n % _STATS_EVERY == 0:
                try:
                    await self.publish_stats()
                except Exception:
                    log.warning("Home Assistant: the agent sensors cannot be read", exc_info=True)

    # -- commands -------------------------------------------------------------------------------
    async def handle(self, topic: str, payload: bytes) -> None:
        """A message on one of :meth:`filters`. Never raises for what it receives."""
        if topic == self.birth:
            if payload.strip() == b"online" and self._publish is not None:
                await self.announce(self._publish)
            return
        parts = topic[len(self.base) + 1 :].split("/")
        if len(parts) != 4:
            return
        kind, name, action, _ = parts
        if kind == "wf":
            wt = next((t for t in self.settings.expose if _level(t) == name), None)
            if wt is None or payload.strip() != b"PRESS":
                log.warning("Home Assistant: ignored %.20r on %s", payload, topic)
                return
            await self._press(wt, action)
        elif kind == "dev" and action == "switch":
            await self._switch(name, payload.strip())

    async def _press(self, wt: str, action: str) -> None:
        from agent._commands import CancelCommand, ResumeCommand, StartCommand

        rid = f"homeassistant-{uuid.uuid4()}"
        command: Any
        if action == "start":
            data = dict(self.settings.start_data.get(wt, {}))
            command = StartCommand(request_id=rid, workflow_type=wt, data=data)
        elif action in ("approve", "reject"):
            wid = await self._oldest_paused(wt)
            if wid is None:
                log.info("Home Assistant: %s pressed, but no %s workflow is paused", action, wt)
                return
            command = (
                ResumeCommand(request_id=rid, workflow_id=wid)
                if action == "approve"
                else CancelCommand(
                    request_id=rid, workflow_id=wid, reason="rejected in Home Assistant"
                )
            )
        else:
            return
        reply = await self.control.execute(command)
        if reply.get("ok"):
            log.info("Home Assistant: %s %s: %s", action, wt, reply.get("workflow_id"))
        else:
            log.warning("Home Assistant: %s %s refused: %s", action, wt, reply.get("error"))

    async def _oldest_paused(self, wt: str) -> str | None:
        row = await self.store.query(
            lambda conn: conn.execute(
                "SELECT id FROM instances WHERE workflow_type = ? AND status = ? "
                "ORDER BY created_at, id LIMIT 1",
                (wt, WorkflowStatus.PAUSED.value),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def _switch(self, name: str, payload: bytes) -> None:
        board = self.board
        device = next((d for d in board if _level(d) == name), None) if board else None
        if device is None or board[device].kind != "output" or payload not in (b"ON", b"OFF"):
            log.warning("Home Assistant: ignored %.20r for switch %s", payload, name)
            return
        holder = self.builder.leases.holder(device)
        if holder is not None:
            log.warning(
                "Home Assistant: refused to switch %s %s: workflow %s holds it",
                device,
                payload.decode(),
                holder,
            )
        else:
            board[device].set(payload == b"ON")
            log.info("Home Assistant: switched %s %s", device, payload.decode())
        self._values.pop(device, None)
        self._poll_board()  # the real value, refused or not
