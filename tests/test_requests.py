"""Request ids (issue 10, finding 10): only accepted commands are remembered; a repeat must be the
same command with the same body to get the first answer, anything else is a ``request_id_conflict``.

Real SQLite files in ``tmp_path``; the MQTT test goes through Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import SQLiteStore, WorkflowBuilder
from agent._control import Control
from agent._mqtt import Topics
from agent._runner import Runner
from agent._store import _MIGRATIONS, SCHEMA_VERSION
from tests._broker import PAYMENT, Broker, probe, running_agent, unique_prefix
from tests.flows.service.harness import SERVICE_DEFS

LONG = {"seconds": 30}


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    async with SQLiteStore(tmp_path / "db") as store:
        runner = Runner(max_concurrent=8)
        builder = WorkflowBuilder(definitions=[SERVICE_DEFS, PAYMENT])
        serving = asyncio.create_task(runner.serve())
        try:
            yield Control(builder=builder, store=store, runner=runner)
        finally:
            await runner.stop(grace=0.5)
            serving.cancel()


async def send(control: Control, command: str, **body: Any) -> dict[str, Any]:
    reply, _ = await control.handle_raw(command, json.dumps(body).encode())
    return reply


def code(reply: dict[str, Any]) -> str | None:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


async def test_a_cancel_reusing_a_starts_request_id_over_mqtt_is_a_conflict_and_cancels_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    cmd = Topics(prefix, "dev1").command_base
    replies = f"caller-{prefix}/replies"
    async with (
        running_agent(
            tmp_path / "db", broker.settings(prefix), definitions=[SERVICE_DEFS]
        ) as agent,
        probe(broker, replies) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        start = {"request_id": "r-1", "workflow_type": "ServiceLong", "data": LONG}
        caller.publish(cmd + "start", {**start, "reply_to": replies})
        await caller.wait_for(lambda ms: len(ms) == 1)
        started = caller.messages[0].json()
        assert started["ok"] is True, started
        wid = started["workflow_id"]

        cancel = {"workflow_id": wid, "reply_to": replies}
        caller.publish(cmd + "cancel", {"request_id": "r-1", "reason": "first", **cancel})
        await caller.wait_for(lambda ms: len(ms) == 2)
        conflict = caller.messages[1].json()
        assert conflict["request_id"] == "r-1"
        assert code(conflict) == "request_id_conflict"
        assert "r-1" in conflict["error"]["message"]

        # Only a cancel with its own request id cancels, with its own reason.
        caller.publish(cmd + "cancel", {"request_id": "r-2", "reason": "second", **cancel})
        await caller.wait_for(lambda ms: len(ms) == 3)
        assert caller.messages[2].json()["ok"] is True
        await agent.wait_finished(1)
        record = await agent.store.load_instance(wid)
        assert record is not None
        assert (record.status, record.error) == ("CANCELLED", "second")

        # The exact start repeated (another reply address) still gets its first answer.
        async with probe(broker, replies + "/again") as again:
            caller.publish(cmd + "start", {**start, "reply_to": replies + "/again"})
            await again.wait_for(lambda ms: len(ms) >= 1)
            assert again.messages[0].json() == started


async def test_a_repeat_with_another_body_is_a_conflict_and_an_exact_repeat_the_first_answer(
    control: Control,
) -> None:
    data = {"seconds": 30, "done": ["a"]}
    first = await send(control, "start", request_id="r-2", workflow_type="ServiceLong", data=data)
    assert first["ok"] is True, first

    other = await send(
        control, "start", request_id="r-2", workflow_type="ServiceLong", data={"seconds": 31}
    )
    assert code(other) == "request_id_conflict"
    saga = await send(
        control, "start", request_id="r-2", workflow_type="ServiceLong", data=data, saga=True
    )
    assert code(saga) == "request_id_conflict"
    get = await send(control, "retry", request_id="r-2", workflow_id=first["workflow_id"])
    assert code(get) == "request_id_conflict"

    # The same command: key order and reply address do not matter.
    same = await send(
        control,
        "start",
        data={"done": ["a"], "seconds": 30},
        workflow_type="ServiceLong",
        request_id="r-2",
        reply_to="some/where/else",
    )
    assert same == first
    assert [r.id for r in await control.store.list_instances()] == [first["workflow_id"]]


async def test_two_different_commands_with_one_request_id_at_once_start_one_workflow(
    control: Control,
) -> None:
    a, b = await asyncio.gather(
        send(control, "start", request_id="r-3", workflow_type="ServiceLong", data=LONG),
        send(control, "start", request_id="r-3", workflow_type="ServiceLong", data={"seconds": 9}),
    )
    assert a["ok"] is True, a
    assert code(b) == "request_id_conflict"
    assert len(await control.store.list_instances()) == 1


async def test_a_rejected_command_is_not_remembered_so_a_corrected_retry_works(
    control: Control,
) -> None:
    typo = await send(control, "start", request_id="r-4", workflow_type="ServiceLng", data=LONG)
    assert code(typo) == "unknown_workflow_type"
    assert await control.store.get_request("r-4") is None
    fixed = await send(control, "start", request_id="r-4", workflow_type="ServiceLong", data=LONG)
    assert fixed["ok"] is True, fixed
    assert (await control.store.list_instances())[0].id == fixed["workflow_id"]

    missing = await send(control, "cancel", request_id="r-5", workflow_id="nope")
    assert code(missing) == "not_found"
    cancel = await send(control, "cancel", request_id="r-5", workflow_id=fixed["workflow_id"])
    assert cancel["ok"] is True, cancel
    assert cancel["workflow_id"] == fixed["workflow_id"]
    # An accepted cancel is remembered: its exact repeat gets the same answer.
    assert await send(control, "cancel", request_id="r-5", workflow_id=fixed["workflow_id"]) == (
        cancel
    )


async def test_a_version_2_database_forgets_its_rejected_replies_and_keeps_the_accepted(
    tmp_path: Path,
) -> None:
    db = tmp_path / "v2.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for version in (1, 2):
        for statement in _MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    ok = {"request_id": "old-ok", "ok": True, "workflow_id": "w1", "status": "ACTIVE"}
    bad = {"request_id": "old-bad", "ok": False, "error": {"code": "invalid_data", "message": "x"}}
    conn.executemany(
        "INSERT INTO requests VALUES (?, ?, 1e9)",
        [("old-ok", json.dumps(ok)), ("old-bad", json.dumps(bad))],
    )
    conn.close()

    async with SQLiteStore(db) as store:
        assert (await store.pragmas())["user_version"] == SCHEMA_VERSION
        assert await store.get_request("old-bad") is None
        assert await store.get_request("old-ok") == ok
    async with SQLiteStore(db, readonly=True) as ro:  # the CLI reads it too
        assert await ro.get_request("old-ok") == ok
