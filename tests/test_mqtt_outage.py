"""Broker outages, an agent that is away, a killed agent, and the outbox cap."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from agent._mqtt import MqttLink, Topics
from tests._broker import (
    PAYMENT,
    ROOT,
    SLOW,
    Broker,
    completed_sequence,
    events_of,
    payload_of,
    probe,
    running_agent,
    start_command,
    unique_prefix,
    until,
)

pytestmark = pytest.mark.timeout(30)

DEVICE = "dev1"
N_WORKFLOWS = 50
EVENTS_PER_WORKFLOW = 10  # workflow_started, 4 x (step_started, step_completed), status_changed


def slow_start(request_id: str, reply_to: str, **data: float) -> dict:
    return start_command(
        request_id, data=data or {}, workflow_type="SlowProcessing", reply_to=reply_to
    )


@pytest.mark.slow
async def test_broker_killed_while_workflows_run_loses_no_event(
    broker_factory, tmp_path: Path
) -> None:
    broker: Broker = broker_factory(persistence=True)
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}/caller"
    settings = broker.settings(prefix, reconnect_min=0.2, reconnect_max=1.0)
    async with (
        probe(broker, t.events, persistent=True, client_id=f"observer-{prefix}") as observer,
        running_agent(
            tmp_path / "db", settings, device=DEVICE, definitions=[SLOW], max_concurrent=10
        ) as agent,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        broker.save()  # the observer's session (its subscription) survives the SIGKILL
        async with probe(broker, replies) as caller:
            for i in range(N_WORKFLOWS):
                caller.publish(t.command_base + "start", slow_start(f"s{i}", replies))
            await caller.wait_for(lambda ms: len(ms) == N_WORKFLOWS)
            assert all(m.json()["ok"] for m in caller.messages)
        await asyncio.sleep(0.3)
        killed_at = time.time()
        broker.kill()
        await asyncio.sleep(0.5)
        assert not agent.link.connected
        await asyncio.sleep(4.5)
        running_during_outage = sum(
            1 for r in await agent.store.list_instances(limit=1000) if not r.status.is_terminal
        )
        broker.restart()
        restarted_at = time.time()

        total = N_WORKFLOWS * EVENTS_PER_WORKFLOW
        await agent.wait_finished(N_WORKFLOWS, within=15)
        await observer.wait_for(
            lambda ms: len({payload_of(m)["seq"] for m in ms}) >= total, within=12
        )
        await agent.wait_outbox_empty(within=5)
        assert not agent.link_task.done()
        assert agent.link.connects >= 2

        payloads = [payload_of(m) for m in observer.on(t.events)]
        by_seq: dict[int, list[dict]] = defaultdict(list)
        for p in payloads:
            by_seq[p["seq"]].append(p)
        assert set(by_seq) == set(range(1, total + 1))  # none lost
        for copies in by_seq.values():  # duplicates only as QoS 1 allows: the same event again
            assert all(c == copies[0] for c in copies)
        workflow_ids = {p["workflow_id"] for p in payloads}
        assert len(workflow_ids) == N_WORKFLOWS
        for wid in workflow_ids:
            events = events_of(observer.messages, wid)
            assert [(e["event"], e["step"]) for e in events] == completed_sequence()
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(seqs)  # per-workflow order kept
        # The outage really happened in the middle: most events were committed while the broker
        # was down, and reached the observer only after the restart.
        during = {
            p["seq"]
            for p in payloads
            if killed_at
            < datetime.fromisoformat(p["at"].replace("Z", "+00:00")).timestamp()
            < restarted_at
        }
        assert len(during) >= 100, (len(during), running_during_outage)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_a_start_sent_while_the_agent_is_away_runs_when_it_returns(
    broker: Broker, tmp_path: Path, version: str
) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}/caller"
    settings = broker.settings(prefix, version=version)
    db = tmp_path / "db"
    async with running_agent(db, settings, device=DEVICE) as agent:  # makes the persistent session
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
    async with probe(broker, replies, version=version) as caller:
        info = caller.publish(
            t.command_base + "start", start_command("while-away", reply_to=replies)
        )
        await asyncio.to_thread(info.wait_for_publish, 5)
        assert info.is_published()  # the broker has it (PUBACK)
        await asyncio.sleep(0.3)
        assert caller.messages == []  # nobody answered: the agent is away
        async with running_agent(db, settings, device=DEVICE) as agent:
            await caller.wait_for(lambda ms: len(ms) == 1)
            reply = caller.messages[0].json()
            assert reply["ok"] is True
            assert reply["request_id"] == "while-away"
            await agent.wait_finished(1)
            (record,) = await agent.store.list_instances()
            assert record.id == reply["workflow_id"]
            assert record.status.value == "COMPLETED"


async def test_last_will_publishes_offline_when_the_agent_is_killed(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    settings = broker.settings(prefix)
    async with probe(broker, t.availability) as watcher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "tests" / "_link_proc.py"),
            str(tmp_path / "db"),
            settings.model_dump_json(),
            DEVICE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)  # type: ignore[union-attr]
            assert line == b"connected\n"
            await watcher.wait_for(lambda ms: [m.payload for m in ms] == [b"online"])
        finally:
            proc.kill()
            await proc.communicate()
        assert proc.returncode == -9
        await watcher.wait_for(
            lambda ms: [m.payload for m in ms] == [b"online", b"offline"], within=5
        )
    # It was the broker's doing (the will): the agent never sent DISCONNECT.
    assert f"Client edgesaga-{DEVICE} disconnected." not in broker.log_text()
    async with probe(broker, t.availability) as late:
        await late.wait_for(lambda ms: bool(ms))
        assert late.messages[-1].payload == b"offline"


async def test_outbox_cap_drops_oldest_finished_events_first_and_alerts(
    broker_factory, tmp_path: Path
) -> None:
    broker: Broker = broker_factory(persistence=True)
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    cap = 25
    settings = broker.settings(prefix, outbox_cap=cap, reconnect_min=0.1, reconnect_max=0.3)
    async with probe(
        broker, t.events, t.alerts, persistent=True, client_id=f"observer-{prefix}"
    ) as observer:
        broker.save()
        broker.kill()
        async with running_agent(
            tmp_path / "db",
            settings,
            device=DEVICE,
            definitions=[PAYMENT, SLOW],
            trim_interval=0.05,
        ) as agent:
            store = agent.store
            # An ACTIVE workflow owns the oldest events; then three payment sagas finish.
            reply, _ = await agent.control.handle_raw(
                "start", json.dumps(slow_start("slow", "x", delay_min=60, delay_max=60)).encode()
            )
            active = reply["workflow_id"]
            finished: list[str] = []
            for i in range(3):
                reply, _ = await agent.control.handle_raw(
                    "start", json.dumps(start_command(f"p{i}")).encode()
                )
                finished.append(reply["workflow_id"])
                await agent.wait_finished(i + 1)

            async def at_cap() -> bool:
                return await store.outbox_count() == cap

            await until(at_cap, within=5)
            await asyncio.sleep(0.3)  # and it stays there
            items = await store.outbox_pending(limit=1000)
            assert len(items) == cap
            events = [i for i in items if i.kind == "event"]
            alerts = [i for i in items if i.kind == "alert"]
            assert alerts
            assert {a.payload["alert"] for a in alerts} == {"outbox_overflow"}
            assert all("outbox_cap" in a.payload["message"] for a in alerts)
            total_events = 2 + 3 * EVENTS_PER_WORKFLOW  # the active one has started its first step
            alert_seqs = {a.seq for a in alerts}
            event_seqs = set(range(1, total_events + len(alerts) + 1)) - alert_seqs
            dropped = sorted(event_seqs - {e.seq for e in events})
            assert sum(a.payload["dropped"] for a in alerts) == len(dropped)
            kept_active = [e.seq for e in events if e.workflow_id == active]
            assert len(kept_active) == 2  # the unfinished workflow lost nothing
            # What went were the oldest events of finished workflows.
            finished_seqs = sorted(s for s in event_seqs if s not in kept_active)
            assert dropped == finished_seqs[: len(dropped)]
            assert not agent.link.connected

            broker.restart()  # the observer's session comes back with the broker
            await asyncio.wait_for(agent.link.connected_event.wait(), 10)
            await agent.wait_outbox_empty(within=10)
            await observer.wait_connected()
            await observer.wait_for(
                lambda ms: len({(m.topic, payload_of(m)["seq"]) for m in ms}) >= cap, within=10
            )
            got_alerts = [payload_of(m) for m in observer.on(t.alerts)]
            assert {a["seq"] for a in got_alerts} == alert_seqs
            assert {payload_of(m)["seq"] for m in observer.on(t.events)} == {e.seq for e in events}
            assert isinstance(agent.link, MqttLink)


async def test_a_cleared_state_topic_stays_cleared_when_old_events_drain_later(
    broker_factory, tmp_path: Path
) -> None:
    """clear_state() while the broker is down, for a workflow whose events still wait in the
    outbox: after the reconnect the events are published, but not their snapshots."""
    broker: Broker = broker_factory()
    broker.kill()
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    settings = broker.settings(prefix, reconnect_min=0.1, reconnect_max=0.3)
    async with running_agent(tmp_path / "db", settings, device=DEVICE) as agent:
        reply, _ = await agent.control.handle_raw(
            "start", json.dumps(start_command("gone")).encode()
        )
        gone = reply["workflow_id"]
        reply, _ = await agent.control.handle_raw(
            "start", json.dumps(start_command("kept")).encode()
        )
        kept = reply["workflow_id"]
        await agent.wait_finished(2)
        assert await agent.store.outbox_count() == 2 * EVENTS_PER_WORKFLOW
        assert await agent.link.clear_state([gone]) == 0  # not connected: cleared after reconnect
        broker.start()
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        await agent.wait_outbox_empty()
        async with probe(broker, t.state(gone), t.state(kept)) as late:
            await late.wait_for(lambda ms: bool(late.on(t.state(kept))))
            await asyncio.sleep(0.3)
            assert late.on(t.state(kept))[-1].json()["status"] == "COMPLETED"
            assert [m for m in late.on(t.state(gone)) if m.payload] == []
