"""The MQTT link against a real Mosquitto: commands, replies, events, retained state, TLS, watch."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent._commands import ERROR_CODES
from agent._mqtt import MqttLink, MqttSettings, Topics
from agent._store import SQLiteStore
from agent._watch import format_event, watch
from tests._broker import (
    PAYMENT_DATA,
    PAYMENT_STEPS,
    Broker,
    completed_sequence,
    events_of,
    probe,
    running_agent,
    start_command,
    unique_prefix,
    until,
)

pytestmark = pytest.mark.timeout(30)

DEVICE = "dev1"


def finished(messages: list, workflow_id: str, status: str) -> bool:
    return any(
        e["event"] == "status_changed" and e["status"] == status
        for e in events_of(messages, workflow_id)
    )


# ------------------------------------------------------------------------------------------------
# start → reply → every event in order → retained snapshot


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_start_replies_and_reports_every_transition(
    broker: Broker, tmp_path: Path, version: str
) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}/caller"
    settings = broker.settings(prefix, version=version)
    async with (
        running_agent(tmp_path / "db", settings, device=DEVICE) as agent,
        probe(broker, t.events, replies, version=version) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        assert agent.link.connected
        if version == "5":
            caller.publish(
                t.command_base + "start",
                start_command("req-1"),
                response_topic=replies,
                correlation=b"corr-1",
            )
        else:
            caller.publish(t.command_base + "start", start_command("req-1", reply_to=replies))
        await caller.wait_for(lambda ms: len([m for m in ms if m.topic == replies]) == 1)
        reply = caller.on(replies)[0]
        body = reply.json()
        assert body["ok"] is True
        assert body["request_id"] == "req-1"
        assert body["status"] == "ACTIVE"
        if version == "5":
            assert reply.correlation == b"corr-1"
        wid = body["workflow_id"]

        await caller.wait_for(lambda ms: finished(ms, wid, "COMPLETED"))
        events = events_of(caller.messages, wid)
        assert [(e["event"], e["step"]) for e in events] == completed_sequence()
        assert events[-1]["status"] == "COMPLETED"
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert all(m.qos == 1 for m in caller.on(t.events))
        assert all(e["workflow_type"] == "PaymentProcessing" for e in events)
        assert [e["attempt"] for e in events if e["event"].startswith("step_")] == [1] * 8

        # A late subscriber gets the final snapshot (retained) and the availability.
        await agent.wait_outbox_empty()
        async with probe(broker, t.state(wid), t.availability, version=version) as late:
            await late.wait_for(lambda ms: len(ms) >= 2)
            snap = late.on(t.state(wid))[-1]
            assert snap.retain
            assert snap.json() == {
                "workflow_id": wid,
                "workflow_type": "PaymentProcessing",
                "status": "COMPLETED",
                "current_step": None,
                "error": None,
                "updated_at": events[-1]["at"],
                "seq": events[-1]["seq"],
            }
            assert late.on(t.availability)[-1].payload == b"online"
        assert not agent.link_task.done()


async def test_failed_step_reports_compensation_and_failed_snapshot(
    broker: Broker, tmp_path: Path
) -> None:
    """MQTT 5 without a response topic: the reply goes to the command's reply_to."""
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}/caller"
    async with (
        running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent,
        probe(broker, t.events, replies) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        data = {**PAYMENT_DATA, "fail_step": "Create_Shipment"}
        caller.publish(
            t.command_base + "start", start_command("req-f", data=data, saga=True, reply_to=replies)
        )
        await caller.wait_for(lambda ms: bool([m for m in ms if m.topic == replies]))
        wid = caller.on(replies)[0].json()["workflow_id"]
        await caller.wait_for(lambda ms: finished(ms, wid, "FAILED_ROLLED_BACK"))
        events = events_of(caller.messages, wid)
        failed = [e for e in events if e["event"] == "step_failed"]
        assert [(e["step"], e["error"]) for e in failed] == [
            ("Create_Shipment", "Exception: Carrier API unavailable")
        ]
        undone = [e["step"] for e in events if e["event"] == "compensation_completed"]
        assert undone == ["Reserve_Inventory", "Charge_Payment", "Create_Order"]
        await agent.wait_outbox_empty()
        async with probe(broker, t.state(wid)) as late:
            await late.wait_for(lambda ms: bool(ms))
            snap = late.messages[-1].json()
            assert snap["status"] == "FAILED_ROLLED_BACK"
            assert snap["error"] == "Exception: Carrier API unavailable"
            assert snap["seq"] == events[-1]["seq"]


# ------------------------------------------------------------------------------------------------
# request-id dedupe


async def test_same_request_twice_starts_one_workflow_with_identical_replies(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}/caller"
    async with (
        running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent,
        probe(broker, replies) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        command = start_command("dup-1")
        caller.publish(t.command_base + "start", command, response_topic=replies, correlation=b"a")
        caller.publish(t.command_base + "start", command, response_topic=replies, correlation=b"b")
        await caller.wait_for(lambda ms: len(ms) == 2)
        first, second = (
            m.json() for m in sorted(caller.messages, key=lambda m: m.correlation or b"")
        )
        assert first == second
        assert first["ok"] is True
        await agent.wait_finished(1)
        instances = await agent.store.list_instances()
        assert [r.id for r in instances] == [first["workflow_id"]]


async def test_repeat_after_completion_gets_the_first_reply(broker: Broker, tmp_path: Path) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}/caller"
    async with (
        running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent,
        probe(broker, replies) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        caller.publish(t.command_base + "start", start_command("dup-2", reply_to=replies))
        await caller.wait_for(lambda ms: len(ms) == 1)
        await agent.wait_finished(1)
        caller.publish(t.command_base + "start", start_command("dup-2", reply_to=replies))
        await caller.wait_for(lambda ms: len(ms) == 2)
        assert len(await agent.store.list_instances()) == 1
        assert caller.messages[0].json() == caller.messages[1].json()


# ------------------------------------------------------------------------------------------------
# availability


async def test_online_on_connect_and_offline_on_clean_stop(broker: Broker, tmp_path: Path) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    async with (
        probe(broker, t.availability) as watcher,
        running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent,
    ):
        await watcher.wait_for(lambda ms: [m.payload for m in ms] == [b"online"])
        agent.link_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent.link_task
        assert agent.link_task.cancelled()  # CancelledError was re-raised, not swallowed
        assert not agent.link.connected
        await watcher.wait_for(lambda ms: [m.payload for m in ms] == [b"online", b"offline"])
    # The link sent DISCONNECT itself (so the broker discarded the will): a clean stop.
    assert f"Client edgesaga-{DEVICE} disconnected." in broker.log_text()
    async with probe(broker, t.availability) as late:
        await late.wait_for(lambda ms: bool(ms))
        assert late.messages[-1].payload == b"offline"
        assert late.messages[-1].retain


# ------------------------------------------------------------------------------------------------
# TLS and authentication


async def test_tls_with_password_connects_and_serves(broker_factory, tmp_path: Path) -> None:
    tls_broker: Broker = broker_factory(tls=True, users={"agent": "s3cret", "ops": "ops-pw"})
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("s3cret\n")  # stripped when read
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    settings = tls_broker.settings(prefix, username="agent", password_file=password_file)
    replies = f"replies/{prefix}/ops"
    async with (
        running_agent(tmp_path / "db", settings, device=DEVICE) as agent,
        probe(tls_broker, t.availability, replies, username="ops", password="ops-pw") as ops,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        await ops.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        ops.publish(
            t.command_base + "list", {"request_id": "l-1"}, response_topic=replies, correlation=b"l"
        )
        await ops.wait_for(lambda ms: bool([m for m in ms if m.topic == replies]))
        reply = ops.on(replies)[0].json()
        assert reply == {"request_id": "l-1", "ok": True, "workflows": [], "next_cursor": None}
        assert agent.link.last_error is None


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_wrong_password_logs_clearly_and_backs_off(
    broker_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    caplog.set_level(logging.WARNING, logger="edgesaga.mqtt")
    tls_broker: Broker = broker_factory(tls=True, users={"agent": "s3cret"})
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("not-the-password\n")
    prefix = unique_prefix()
    settings = tls_broker.settings(
        prefix,
        version=version,
        username="agent",
        password_file=password_file,
        reconnect_min=0.2,
        reconnect_max=10.0,
    )

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refused the connection" in r.getMessage()]

    async with running_agent(tmp_path / "db", settings, device=DEVICE) as agent:
        await until(lambda: len(failures()) >= 5, within=12)
        task = agent.link_task
        assert not task.done()
        assert not agent.link.connected
        records = failures()
        line = records[0].getMessage()
        assert "bad username or password" in line
        assert "check mqtt.username / password_file" in line
        assert records[0].levelno == logging.ERROR
        times = [r.created for r in records]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Each gap at least as long as the one before (jitter stays inside [base/2, base]),
        # so the last is far longer than the first.
        assert all(later >= earlier * 0.8 for earlier, later in itertools.pairwise(gaps)), gaps
        assert gaps[-1] > 2 * gaps[0], gaps
        assert agent.link.attempts >= 5
        assert agent.link_task is task
        assert not task.done()


async def test_unreachable_broker_is_retried_without_crashing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests._broker import HOST, free_port

    caplog.set_level(logging.WARNING, logger="edgesaga.mqtt")
    settings = MqttSettings(
        host=HOST,
        port=free_port(),
        topic_prefix=unique_prefix(),
        reconnect_min=0.05,
        reconnect_max=0.1,
    )
    async with running_agent(tmp_path / "db", settings, device=DEVICE) as agent:
        await until(lambda: agent.link.attempts >= 4, within=5)
        assert not agent.link_task.done()
        lines = [r.getMessage() for r in caplog.records]
        assert any(
            "cannot reach the MQTT broker" in line and "retrying in" in line for line in lines
        )
        # Workflows do not wait for the broker.
        reply, _ = await agent.control.handle_raw(
            "start", json.dumps(start_command("offline-1")).encode()
        )
        assert reply["ok"] is True
        await agent.wait_finished(1)
        assert await agent.store.outbox_count() == 10  # kept for later


# ------------------------------------------------------------------------------------------------
# clear_state, watch, settings


async def test_clear_state_removes_the_retained_snapshot(broker: Broker, tmp_path: Path) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    async with running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent:
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        reply, _ = await agent.control.handle_raw(
            "start", json.dumps(start_command("c-1")).encode()
        )
        wid = reply["workflow_id"]
        await agent.wait_finished(1)
        await agent.wait_outbox_empty()
        async with probe(broker, t.state(wid)) as before:
            await before.wait_for(lambda ms: bool(ms))
            assert before.messages[-1].json()["status"] == "COMPLETED"
        assert await agent.link.clear_state([wid]) == 1
        async with probe(broker, t.state(wid)) as after:
            await asyncio.sleep(0.3)
            assert after.messages == []


async def test_watch_prints_one_line_per_event(broker: Broker, tmp_path: Path) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    settings = broker.settings(prefix)
    out = io.StringIO()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(watch(settings, "+", out), name="watch")
        async with probe(broker) as pinger:
            # Wait until the watcher is subscribed: it prints our ping.
            async with asyncio.timeout(10):
                while "ping" not in out.getvalue():
                    pinger.publish(t.events, {"at": "T", "workflow_id": "ping", "event": "ping"})
                    await asyncio.sleep(0.1)
        async with running_agent(tmp_path / "db", settings, device=DEVICE) as agent:
            await asyncio.wait_for(agent.link.connected_event.wait(), 10)
            reply, _ = await agent.control.handle_raw(
                "start", json.dumps(start_command("w-1")).encode()
            )
            wid = reply["workflow_id"]
            await until(lambda: " COMPLETED" in out.getvalue(), within=10)
        watcher.cancel()
    lines = [line for line in out.getvalue().splitlines() if wid[:8] in line]
    assert len(lines) == 10
    at, device, short, event, step, attempt, status = lines[1].split(" ")
    assert (device, short, event, step, attempt, status) == (
        DEVICE,
        wid[:8],
        "step_started",
        PAYMENT_STEPS[0],
        "attempt=1",
        "ACTIVE",
    )
    assert at.endswith("Z")
    assert lines[-1].split(" ")[3:] == ["status_changed", "-", "attempt=-", "COMPLETED"]


def test_format_event_for_alerts_and_junk() -> None:
    alert = {
        "at": "2026-01-01T00:00:00.000Z",
        "alert": "outbox_overflow",
        "workflow_id": None,
        "message": "dropped 3",
    }
    line = format_event("pfx/dev9/alerts", json.dumps(alert).encode(), "pfx")
    assert line == "2026-01-01T00:00:00.000Z dev9 - ALERT outbox_overflow - dropped 3"
    assert (
        format_event("pfx/dev9/events", b"\xff\x00", "pfx")
        == "- dev9 - (unreadable message on pfx/dev9/events)"
    )
    event = {
        "at": "A",
        "workflow_id": "abcdef0123",
        "event": "step_failed",
        "step": "S",
        "attempt": 2,
        "status": "ACTIVE",
        "error": "boom",
    }
    assert (
        format_event("a/b/dev2/events", json.dumps(event).encode(), "a/b")
        == "A dev2 abcdef01 step_failed S attempt=2 ACTIVE boom"
    )


def test_settings_validate_and_read_the_password(tmp_path: Path) -> None:
    defaults = MqttSettings()
    assert (defaults.host, defaults.port, defaults.version, defaults.keepalive) == (
        "localhost",
        1883,
        "5",
        30,
    )
    assert (defaults.topic_prefix, defaults.max_payload, defaults.outbox_cap) == (
        "edgesaga",
        65536,
        100_000,
    )
    assert defaults.session_expiry == 7 * 24 * 3600
    assert MqttSettings.model_validate({"version": 5}).version == "5"
    assert MqttSettings.model_validate({"version": "3.1.1"}).version == "3.1.1"
    for bad in (
        {"hostname": "x"},
        {"version": "4"},
        {"topic_prefix": "a/#"},
        {"reconnect_min": 5, "reconnect_max": 1},
        {"tls": {"key_file": "k.pem"}},
        {"tls": {"ca": "x"}},
    ):
        with pytest.raises(ValidationError):
            MqttSettings.model_validate(bad)
    secret = tmp_path / "pw"
    secret.write_text("  hunter2 \n")
    assert MqttSettings(password_file=secret).read_password() == "hunter2"
    assert MqttSettings().read_password() is None


def test_link_rejects_a_device_id_that_is_not_a_topic_level(tmp_path: Path) -> None:
    async def handler(name: str, payload: bytes) -> tuple[dict, str | None]:
        return {}, None

    store = SQLiteStore(tmp_path / "db")
    for bad in ("a/b", "a+", "#", ""):
        with pytest.raises(ValueError, match="device id"):
            MqttLink(settings=MqttSettings(), device_id=bad, store=store, handler=handler)
    link = MqttLink(
        settings=MqttSettings(topic_prefix="p"), device_id="pi-7", store=store, handler=handler
    )
    assert link.client_id == "edgesaga-pi-7"
    assert link.topics.commands == "p/pi-7/cmd/+"
    assert not link.connected


def test_error_codes_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text()
    missing = [code for code in ERROR_CODES if f"`{code}`" not in doc]
    assert missing == []
