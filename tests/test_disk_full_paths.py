"""A full disk on every path (issue 10, finding 2): the documented ``disk_full`` error reply over
the control socket, MQTT ``reply_to`` and the MQTT 5 response topic (and nothing remembered, so the
same command works once space is back); an alert published at once, straight to the broker; the
outputs a stalled workflow holds driven safe after ``disk_full_grace``; work going on afterwards.

Two ways to fill a disk: SQLite's own limit (``PRAGMA max_page_count``, in process) with writes
that need new pages, and, for the agent subprocess, a real 4 MiB tmpfs filled to the last byte
(tests/failsafe/harness.py's ``SmallDisk``; mounting needs root, as in tests/test_fail_safe.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import DiskFull, SQLiteStore, StepContext, WorkflowBuilder
from agent._control import Control
from agent._mqtt import Topics
from agent._runner import Runner
from agent._socket import ControlServer, request
from hardware import Board
from tests._broker import Broker, probe, running_agent, unique_prefix
from tests._hw_fixtures import states
from tests.failsafe.harness import SmallDisk
from tests.flows.service.harness import (
    SERVICE_DEFS,
    AgentProcess,
    agent_process,
    cli,
    poll,
    write_config,
)
from tests.flows.service.steps import ServiceState

#: Initial data whose state needs several new pages (1 KiB each) to be stored.
BIG = {"seconds": 30, "flag": "x" * 6000}


def hold(state: ServiceState, context: StepContext, release: str, **params: Any) -> dict:
    """A (sync, so on a worker thread) step that returns once the file ``release`` exists."""
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"done": [*state.done, context.step_name]}


async def cap_pages(store: SQLiteStore, extra: int) -> None:
    """Let the database grow by at most ``extra`` more pages: with ``extra`` 0, a write that needs
    more new pages than the file has free ones finds the disk full (``BIG`` needs six)."""

    def fn(conn: sqlite3.Connection) -> None:
        count = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {count + extra}").fetchone()
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] < 3

    await store.read(fn)


async def fill(store: SQLiteStore) -> None:
    """Full, also for small writes: cap the pages, then fill the outbox's last page with tiny
    alerts until one does not fit (every commit of a workflow writes events there)."""
    await cap_pages(store, 0)
    for _ in range(500):
        try:
            await store.add_alert({})
        except DiskFull:
            return
    raise AssertionError("the outbox never filled up")


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    async with SQLiteStore(tmp_path / "db") as store:
        runner = Runner(max_concurrent=4)
        serving = asyncio.create_task(runner.serve())
        try:
            yield Control(
                builder=WorkflowBuilder(definitions=[SERVICE_DEFS]), store=store, runner=runner
            )
        finally:
            await runner.stop(grace=0.5)
            serving.cancel()


def start(request_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "workflow_type": "ServiceLong", "data": BIG}


def is_disk_full(reply: dict[str, Any], request_id: str) -> bool:
    error = reply.get("error") or {}
    return (
        reply.get("request_id") == request_id
        and reply.get("ok") is False
        and error.get("code") == "disk_full"
        and "is full" in error.get("message", "")
    )


# ------------------------------------------------------------------------------------------------
# Replies


async def test_the_control_socket_replies_disk_full_and_the_same_start_works_after(
    control: Control, tmp_path: Path
) -> None:
    server = ControlServer(path=tmp_path / "control.sock", handle_raw=control.handle_raw)
    await server.start()
    try:
        await cap_pages(control.store, 0)
        fields = {k: v for k, v in start("d-1").items()}
        reply = await asyncio.to_thread(request, server.path, "start", **fields)
        assert is_disk_full(reply, "d-1"), reply
        assert await control.store.list_instances() == []

        await cap_pages(control.store, 10_000)  # space is freed: the same command now starts
        again = await asyncio.to_thread(request, server.path, "start", **fields)
        assert again["ok"] is True, again
        assert [r.id for r in await control.store.list_instances()] == [again["workflow_id"]]
    finally:
        await server.close()


async def test_mqtt_replies_disk_full_to_reply_to_and_to_the_response_topic(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    cmd = Topics(prefix, "dev1").command_base + "start"
    replies = f"caller-{prefix}/replies"
    async with (
        running_agent(
            tmp_path / "db", broker.settings(prefix), definitions=[SERVICE_DEFS]
        ) as agent,
        probe(broker, replies) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        await cap_pages(agent.store, 0)
        caller.publish(cmd, {**start("m-1"), "reply_to": replies})
        caller.publish(cmd, start("m-2"), response_topic=replies, correlation=b"c-2")
        await caller.wait_for(lambda ms: len(ms) == 2)
        by_id = {m.json()["request_id"]: m for m in caller.messages}
        assert is_disk_full(by_id["m-1"].json(), "m-1"), by_id["m-1"].json()
        assert is_disk_full(by_id["m-2"].json(), "m-2"), by_id["m-2"].json()
        assert by_id["m-2"].correlation == b"c-2"
        assert await agent.store.list_instances() == []

        await cap_pages(agent.store, 10_000)
        caller.publish(cmd, {**start("m-1"), "reply_to": replies})
        await caller.wait_for(lambda ms: len(ms) == 3)
        assert caller.messages[2].json()["ok"] is True, caller.messages[2].json()


# ------------------------------------------------------------------------------------------------
# The grace


@pytest.fixture
def held_board(mock_factory: Any) -> Iterator[Board]:
    devices = {"valve": {"kind": "output", "pin": 17}, "pump": {"kind": "output", "pin": 27}}
    with Board(devices=devices, pin_factory=mock_factory) as hw:
        yield hw


async def test_outputs_of_a_workflow_stalled_by_a_full_disk_go_safe_after_the_grace_then_it_goes_on(
    tmp_path: Path, held_board: Board
) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    service = "tests.flows.service.steps"
    (defs / "held.yaml").write_text(
        yaml.safe_dump(
            {
                "workflow_type": "DiskHeld",
                "workflow_version": "1.0.0",
                "initial_state_model": f"{service}.ServiceState",
                "resources": ["valve"],
                "steps": [
                    {
                        "name": "Valve_On",
                        "function": f"{service}.lamp_on",
                        "params": {"device": "valve"},
                        "automate_next": True,
                    },
                    {
                        "name": "Hold",
                        "function": f"{__name__}.hold",
                        "params": {"release": str(tmp_path / "release")},
                        "automate_next": True,
                    },
                    {"name": "Done", "function": f"{service}.quick"},
                ],
            }
        )
    )
    builder = WorkflowBuilder(definitions=[defs], hardware=held_board)
    held_board["pump"].on()  # another device, not held by the workflow: left as it is
    async with SQLiteStore(tmp_path / "db", disk_full_grace=0.5) as store:
        wf = await builder.create_workflow("DiskHeld", {}, store=store)
        run = asyncio.create_task(wf.run())
        await poll_async(lambda: wf.current_step == "Hold" and held_board["valve"].value)
        await fill(store)
        (tmp_path / "release").touch()  # Hold returns; its result cannot be committed
        t0 = time.monotonic()
        await poll_async(lambda: not held_board["valve"].value, within=5)
        assert time.monotonic() - t0 >= 0.45, "the valve went safe before the grace"
        assert store.disk_full
        assert states(held_board, "valve") == [False, True, False]
        assert held_board["pump"].value  # not this workflow's
        assert not run.done()
        rec = await store.load_instance(wf.id)
        assert rec is not None
        assert (rec.status, rec.current_step) == ("ACTIVE", "Hold")  # waiting, not failed

        await cap_pages(store, 10_000)  # space is back: it goes on, as after a restart
        assert await asyncio.wait_for(run, 15) == "COMPLETED"
        assert [(j.step, j.outcome) for j in await store.journal(wf.id)] == [
            ("Valve_On", "completed"),
            ("Hold", "completed"),
            ("Done", "completed"),
        ]
        assert states(held_board, "valve") == [False, True, False]  # not switched on again
        assert not store.disk_full


async def poll_async(predicate: Any, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# The agent process on a real full disk


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    small = SmallDisk(tmp_path / "disk")
    try:
        yield small
    finally:
        small.unmount()


async def test_the_agent_on_a_full_disk_alerts_at_once_and_every_path_gets_disk_full(
    tmp_path: Path, broker: Broker, disk: SmallDisk
) -> None:
    prefix = unique_prefix()
    alerts = f"{prefix}/svc-test/alerts"
    config = write_config(
        tmp_path,
        database=str(disk.path / "edgesaga.db"),
        mqtt={"port": broker.port, "topic_prefix": prefix, "reconnect_max": 1.0},
    )
    with agent_process(config) as agent:
        await asyncio.to_thread(agent.wait_ready)
        await asyncio.to_thread(
            poll,
            lambda: agent.request("status"),
            lambda s: s["mqtt_connected"] is True,
            what="the agent to connect to the broker",
        )
        async with probe(broker, alerts) as watcher:
            disk.fill()
            reply = await asyncio.to_thread(agent.request, "start", **start("a-1"))
            assert is_disk_full(reply, "a-1"), reply
            assert str(disk.path) in reply["error"]["message"]

            await watcher.wait_for(lambda ms: len(ms) >= 1)
            alert = watcher.messages[0].json()
            assert alert["alert"] == "disk_full"
            assert alert["seq"] is None  # straight to the broker, never in the outbox
            assert str(disk.path) in alert["message"]
            assert disk.free_bytes() == 0  # published while the disk was still full

            # The CLI through the agent: one sentence naming the code, no traceback.
            args = ["start", "ServiceLong", "--data", json.dumps(BIG)]
            refused = await asyncio.to_thread(cli, config, *args)
            assert refused.returncode == 2, refused
            assert "disk_full" in refused.stderr
            assert "is full" in refused.stderr
            assert "Traceback" not in refused.stderr

            # One alert for the episode, not one per failed write.
            again = await asyncio.to_thread(agent.request, "start", **start("a-2"))
            assert is_disk_full(again, "a-2"), again
            assert len(watcher.on(alerts)) == 1

            disk.free()
            started = await asyncio.to_thread(agent.request, "start", **start("a-1"))
            assert started["ok"] is True, started
        assert "Traceback" not in _log(agent)


def _log(agent: AgentProcess) -> str:
    return agent.log_text()


async def test_the_cli_without_an_agent_says_the_disk_is_full_in_one_sentence(
    tmp_path: Path, disk: SmallDisk
) -> None:
    config = write_config(tmp_path, database=str(disk.path / "edgesaga.db"))
    first = await asyncio.to_thread(cli, config, "start", "ServiceQuick", "--id", "q-1")
    assert first.returncode == 0, first  # the database exists, with one workflow
    disk.fill()
    args = ["start", "ServiceLong", "--data", json.dumps(BIG), "--id", "q-2"]
    refused = await asyncio.to_thread(cli, config, *args)
    assert refused.returncode == 2, refused
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("edgesaga: error: The disk holding"), refused.stderr
    assert "is full" in refused.stderr
    # SQLite cannot even open it to read (it needs a -shm file): the same sentence.
    listed = await asyncio.to_thread(cli, config, "list")
    assert listed.returncode == 2, listed
    assert listed.stderr.startswith("edgesaga: error: The disk holding"), listed.stderr
    assert "Traceback" not in refused.stderr + listed.stderr

    disk.free()
    listed = await asyncio.to_thread(cli, config, "list", "--json")
    assert listed.returncode == 0, listed
    assert [w["workflow_id"] for w in json.loads(listed.stdout)] == ["q-1"]  # nothing lost
