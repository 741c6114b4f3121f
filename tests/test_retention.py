"""Retention: finished workflows beyond the limits are pruned with their journal, ACTIVE
ones are kept, the database file stops growing, and pruned workflows' retained MQTT state topics are
cleared. The agent runs in process (``Agent.run()`` in a task) so the test can call ``prune()``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent._config import AgentConfig, load_config
from agent._sdnotify import Notifier
from agent._service import Agent
from tests._broker import Broker, unique_prefix
from tests.flows.service.harness import retained, write_config

DEVICE = "svc-test"


class _ReadyNotifier(Notifier):
    """No systemd here: READY only sets an event the test waits on."""

    def __init__(self) -> None:
        super().__init__(environ={})
        self.is_ready = asyncio.Event()

    def ready(self, status: str | None = None) -> bool:
        self.is_ready.set()
        return False


def _config(
    directory: Path, *, retention: dict[str, Any], mqtt: dict[str, Any] | None = None, **extra: Any
) -> AgentConfig:
    path = write_config(
        directory,
        retention={"interval": 3600, **retention},
        hardware=None,
        grace_period=0,
        max_concurrent=16,
        mqtt=mqtt,
        **extra,
    )
    return load_config(path, environ={})


@contextlib.asynccontextmanager
async def running(cfg: AgentConfig) -> AsyncIterator[Agent]:
    notifier = _ReadyNotifier()
    agent = Agent(cfg, notifier=notifier)
    task = asyncio.create_task(agent.run(), name="agent")
    ready = asyncio.create_task(notifier.is_ready.wait())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what stopped it
        assert ready in done, "the agent was not ready within 15 s"
        yield agent
    finally:
        ready.cancel()
        agent.request_stop()
        try:
            assert await asyncio.wait_for(task, 15) == 0
        finally:
            if not task.done():
                task.cancel()


async def _start(agent: Agent, workflow_type: str, data: dict[str, Any] | None = None) -> str:
    assert agent.control is not None
    payload = {
        "request_id": f"r-{uuid.uuid4()}",
        "workflow_type": workflow_type,
        "data": data or {},
    }
    reply, _ = await agent.control.handle_raw("start", json.dumps(payload).encode())
    assert reply["ok"], reply
    return str(reply["workflow_id"])


async def _until(check: Callable[[], Any], what: str, within: float = 15.0) -> None:
    """Wait until ``check()`` (a plain or async callable) is true, bounded by ``within``."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _finished(agent: Agent, ids: list[str]) -> None:
    assert agent.store is not None
    store = agent.store

    async def check() -> bool:
        for wid in ids:
            rec = await store.load_instance(wid)
            if rec is None or not rec.status.is_terminal:
                return False
        return True

    await _until(check, f"{len(ids)} workflows to finish")


async def _run_one(agent: Agent, workflow_type: str, data: dict[str, Any] | None = None) -> str:
    wid = await _start(agent, workflow_type, data)
    await _finished(agent, [wid])
    return wid


def _rows(database: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return {
            "instances": conn.execute("SELECT count(*) FROM instances").fetchone()[0],
            "orphan_journal": conn.execute(
                "SELECT count(*) FROM journal WHERE n NOT IN (SELECT n FROM instances)"
            ).fetchone()[0],
            "outbox": conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
            "requests": conn.execute("SELECT count(*) FROM requests").fetchone()[0],
        }
    finally:
        conn.close()


def _size(database: Path) -> int:
    return sum(os.path.getsize(p) for p in (database, Path(f"{database}-wal")) if os.path.exists(p))


# ------------------------------------------------------------------------------------------------


async def test_prune_keeps_the_newest_finished_and_every_active_workflow(tmp_path: Path) -> None:
    cfg = _config(tmp_path, retention={"max_finished": 5, "max_age_days": 30})
    async with running(cfg) as agent:
        assert agent.store is not None
        assert agent.control is not None
        active = [await _start(agent, "ServiceLong", {"seconds": 60}) for _ in range(2)]
        failed = await _run_one(agent, "ServiceFlaky")  # FAILED counts as finished
        finished = [await _run_one(agent, "ServiceQuick") for _ in range(12)]

        pruned = await agent.prune()

        assert sorted(pruned) == sorted([failed, *finished[:7]])  # 13 finished, 5 kept
        for wid in pruned:
            assert await agent.store.load_instance(wid) is None
            assert await agent.store.journal(wid) == []
            reply, _ = await agent.control.handle_raw(
                "get", json.dumps({"request_id": f"g-{wid}", "workflow_id": wid}).encode()
            )
            assert reply["error"]["code"] == "not_found"
        for wid in finished[7:]:
            assert (await agent.store.load_instance(wid)).status.value == "COMPLETED"  # type: ignore[union-attr]
            assert len(await agent.store.journal(wid)) == 2
        for wid in active:
            assert (await agent.store.load_instance(wid)).status.value == "ACTIVE"  # type: ignore[union-attr]
        rows = _rows(cfg.database)
        assert rows["instances"] == 5 + 2
        assert rows["orphan_journal"] == 0
        assert await agent.prune() == []  # nothing more to do


async def test_prune_by_age_keeps_recent_and_active_workflows(tmp_path: Path) -> None:
    cfg = _config(tmp_path, retention={"max_finished": None, "max_age_days": 1.0 / 86400})  # 1 s
    async with running(cfg) as agent:
        assert agent.store is not None
        active = await _start(agent, "ServiceLong", {"seconds": 60})
        old = [await _run_one(agent, "ServiceQuick") for _ in range(3)]
        await asyncio.sleep(1.3)
        recent = [await _run_one(agent, "ServiceQuick") for _ in range(2)]

        assert sorted(await agent.prune()) == sorted(old)
        left = {r.id for r in await agent.store.list_instances(limit=100)}
        assert left == {active, *recent}


@pytest.mark.parametrize("with_mqtt", [False, True], ids=["mqtt-off", "mqtt-on"])
async def test_database_size_plateaus_over_rounds_of_run_and_prune(
    tmp_path: Path, broker_factory: Callable[..., Broker], with_mqtt: bool
) -> None:
    mqtt = None
    if with_mqtt:
        broker = broker_factory()
        mqtt = {"port": broker.port, "topic_prefix": unique_prefix(), "reconnect_max": 1.0}
    cfg = _config(tmp_path, retention={"max_finished": 5, "max_age_days": 30}, mqtt=mqtt)
    sizes: list[int] = []
    rows: list[dict[str, int]] = []
    async with running(cfg) as agent:
        assert agent.store is not None
        store = agent.store
        if with_mqtt:
            await _until(lambda: agent.link is not None and agent.link.connected, "MQTT")
        for _ in range(5):
            ids = [await _start(agent, "ServiceQuick") for _ in range(50)]
            await _finished(agent, ids)
            if with_mqtt:
                await _until(lambda: _outbox_empty(store), "the outbox to drain")
            await agent.prune()
            sizes.append(_size(cfg.database))
            rows.append(_rows(cfg.database))
    assert _rows(cfg.database)["instances"] == 5
    # Round 5 no bigger than round 2 (+10 %): freed pages are reused, nothing accumulates.
    assert sizes[4] <= sizes[1] * 1.1, (
        f"db+wal bytes after each round: {sizes}; "
        f"outbox rows: {[r['outbox'] for r in rows]}; requests rows: {[r['requests'] for r in rows]}"
    )


async def _outbox_empty(store: Any) -> bool:
    return await store.outbox_count() == 0


# ------------------------------------------------------------------------------------------------
# MQTT: retained state topics of pruned workflows


def _state_topics(prefix: str) -> str:
    return f"{prefix}/{DEVICE}/workflows/+/state"


def _wid_of(topic: str) -> str:
    return topic.split("/")[-2]


async def test_pruned_workflows_retained_state_is_cleared(tmp_path: Path, broker: Broker) -> None:
    prefix = unique_prefix()
    cfg = _config(
        tmp_path,
        retention={"max_finished": 3, "max_age_days": 30},
        mqtt={"port": broker.port, "topic_prefix": prefix, "reconnect_max": 1.0},
    )
    async with running(cfg) as agent:
        assert agent.store is not None
        store = agent.store
        ids = [await _run_one(agent, "ServiceQuick") for _ in range(8)]
        await _until(lambda: _outbox_empty(store), "the outbox to drain")
        before = await asyncio.to_thread(retained, broker.port, _state_topics(prefix))
        assert {_wid_of(t) for t in before} == set(ids)
        assert all(json.loads(p)["status"] == "COMPLETED" for p in before.values())

        pruned = await agent.prune()
        assert sorted(pruned) == sorted(ids[:5])
        after = await asyncio.to_thread(retained, broker.port, _state_topics(prefix))
        assert {_wid_of(t) for t in after} == set(ids[5:])


async def test_pruned_while_the_broker_is_down_stays_cleared_after_reconnect(
    tmp_path: Path, broker_factory: Callable[..., Broker]
) -> None:
    """Workflows finish and are pruned while the broker is unreachable; their events are still in
    the outbox. After the agent reconnects and drains the outbox, no pruned workflow may have a
    retained state topic (that snapshot would be stale forever)."""
    broker = broker_factory()
    broker.kill()
    prefix = unique_prefix()
    cfg = _config(
        tmp_path,
        retention={"max_finished": 2, "max_age_days": 30},
        mqtt={
            "port": broker.port,
            "topic_prefix": prefix,
            "reconnect_min": 0.2,
            "reconnect_max": 0.5,
        },
    )
    async with running(cfg) as agent:
        assert agent.store is not None
        assert agent.link is not None
        store, link = agent.store, agent.link
        ids = [await _run_one(agent, "ServiceQuick") for _ in range(5)]
        pruned = await agent.prune()
        assert sorted(pruned) == sorted(ids[:3])

        broker.start()
        await _until(lambda: link.connected, "the agent to reconnect")
        await _until(lambda: _outbox_empty(store), "the outbox to drain")
        await asyncio.sleep(0.3)  # let the last retained publishes settle at the broker
        after = await asyncio.to_thread(retained, broker.port, _state_topics(prefix))
        assert {_wid_of(t) for t in after} == set(ids[3:]), sorted(after)
