"""Fail safe (issue 10, acceptance): a real ``edgesaga run --config`` on mock valve/pump/level pins
meets each fault, and ends with every output at its safe value and nothing committed lost.

Faults: (a) SIGTERM while a workflow waits for another one's devices, (b) a disk that stays full
past ``disk_full_grace``, (c) an exception escaping a workflow's driver, (d) SIGKILL mid-step.
Pin histories are exact: the agent's own ``pins`` command (``history``: every state a mock pin
took, oldest first) while it runs, and, for an agent that has exited, the same lists written by the
process as it exits (tests/failsafe/steps.py). docs/reliability.md states what each test proves.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.failsafe.harness import (
    IRRIGATION_STEPS,
    FailSafeAgent,
    MqttLog,
    SmallDisk,
    failsafe_agent,
    mqtt_log,
    outputs,
    statuses,
    write_config,
)
from tests.flows.service.harness import journal, poll

pytestmark = pytest.mark.slow

ON = {"valve": [False, True], "pump": [False, True]}  # switched on once, still on
ON_OFF = {"valve": [False, True, False], "pump": [False, True, False]}  # ... and off again
NEVER_ON = {"valve": [False], "pump": [False]}
QUICK_ROWS = [("Note", "forward", "completed"), ("Done", "forward", "completed")]
FINISHED_IRRIGATION = [(s, "forward", "completed") for s in IRRIGATION_STEPS]
RESUMED_IRRIGATION = [
    ("Open_Valve", "forward", "completed"),
    ("Start_Pump", "forward", "completed"),
    ("Wait_For_Level", "forward", "interrupted"),
    *[(s, "forward", "completed") for s in IRRIGATION_STEPS[2:]],
]


@pytest.fixture
def prefix() -> str:
    return f"fs-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    small = SmallDisk(tmp_path / "disk")
    try:
        yield small
    finally:
        small.unmount()


def _ids(agent: FailSafeAgent) -> set[str]:
    """Every workflow the agent's database holds."""
    return {w["workflow_id"] for w in agent.request("list", limit=100)["workflows"]}


def _quick(agent: FailSafeAgent) -> str:
    """A committed, finished workflow that no fault may lose."""
    wid = agent.start("FsQuick", workflow_id="Q1")
    agent.wait_status(wid, "COMPLETED")
    return wid


def _one_runs_one_waits(agent: FailSafeAgent) -> None:
    """I1 holds valve, pump and level in Wait_For_Level; I2 waits for those devices."""
    agent.start("FsIrrigation", workflow_id="I1")
    agent.wait_started("I1", "Wait_For_Level")
    agent.start("FsIrrigation", workflow_id="I2")
    poll(
        lambda: agent.get("I2"),
        lambda info: info.get("waiting_for") == ["level", "pump", "valve"],
        what="I2 to wait for I1's devices",
    )
    assert outputs(agent.history()) == ON


def _restart_and_finish(config: Path, log_name: str) -> None:
    """Start the agent again: outputs are safe before recovery and recovery switches nothing on;
    once the float switch closes, I1 resumes at Wait_For_Level and I2 runs from its start."""
    with failsafe_agent(config, log_name=log_name) as agent:
        assert outputs(agent.history()) == NEVER_ON
        # Recovery records I1's cut attempt just after READY (the feed runs after it): wait for it.
        log = poll(
            agent.log_text,
            lambda t: "workflow I1 step_failed step=Wait_For_Level attempt=1" in t,
            within=10,
            what="recovery to record I1's cut attempt",
        )
        safe_at = log.index("outputs set to their safe values")
        assert safe_at < log.index("workflow I1 step_failed step=Wait_For_Level attempt=1")
        assert safe_at < log.index("workflow(s) recovered")
        agent.set_input("level", True)
        agent.wait_status("I1", "COMPLETED", within=15)
        agent.wait_status("I2", "COMPLETED", within=15)
        assert agent.steps("I1") == RESUMED_IRRIGATION
        assert agent.steps("I2") == FINISHED_IRRIGATION
        assert agent.get("Q1")["status"] == "COMPLETED"  # committed before the fault: kept
        assert agent.steps("Q1") == QUICK_ROWS
        assert _ids(agent) == {"Q1", "I1", "I2"}
        # I1 ran on with its outputs at their safe values (docs/hardware.md); I2 drove them
        assert outputs(agent.history()) == ON_OFF
        agent.terminate()
        assert agent.wait_exit(within=15) == 0


# -- (a) SIGTERM while a workflow waits for a lease ------------------------------------------------


def test_sigterm_while_a_workflow_waits_for_a_lease(
    tmp_path: Path, broker: Any, prefix: str
) -> None:
    config = write_config(tmp_path, broker_port=broker.port, prefix=prefix)
    pin_log = tmp_path / "pins-at-exit.json"
    with mqtt_log(broker.port, prefix) as mqtt:
        with failsafe_agent(config, pin_log=pin_log) as agent:
            mqtt.wait_availability(b"online")
            _quick(agent)
            _one_runs_one_waits(agent)
            agent.terminate()
            # grace_period is 1 s: I1's step is cut short then, I2's wait for the lease with it
            assert agent.wait_exit(within=10) == 0, agent.log_text()
        # every output was switched off by the agent before it exited
        assert outputs(json.loads(pin_log.read_text())) == ON_OFF
        mqtt.wait_availability(b"offline")
    # nothing committed lost: both irrigations stay ACTIVE for recovery, with their journals
    db = Path(agent.database)
    assert statuses(db) == {"Q1": "COMPLETED", "I1": "ACTIVE", "I2": "ACTIVE"}
    assert [(s, o) for s, _, _, o in journal(db, "I1")][:2] == [
        ("Open_Valve", "completed"),
        ("Start_Pump", "completed"),
    ]
    assert journal(db, "I2") == []
    assert [s for s, _, _, o in journal(db, "Q1") if o == "completed"] == ["Note", "Done"]
    _restart_and_finish(config, "agent-restarted.log")


# -- (b) a disk that stays full past the grace -------------------------------------------------------


def test_a_disk_that_stays_full_past_the_grace(
    tmp_path: Path, broker: Any, prefix: str, disk: SmallDisk
) -> None:
    config = write_config(
        tmp_path,
        broker_port=broker.port,
        prefix=prefix,
        database=str(disk.path / "edgesaga.db"),
        disk_full_grace=1,
    )
    mark, release = tmp_path / "hold.mark", tmp_path / "hold.release"
    with mqtt_log(broker.port, prefix) as mqtt, failsafe_agent(config) as agent:
        mqtt.wait_availability(b"online")
        _quick(agent)
        agent.start("FsHold", {"mark": str(mark), "release": str(release)}, workflow_id="H1")
        poll(mark.exists, bool, what="Hold to start")
        assert outputs(agent.history())["valve"] == [False, True]

        disk.fill()
        released = time.monotonic()
        release.touch()  # Hold returns; its result cannot be committed
        poll(lambda: agent.pins()["pins"]["valve"], lambda v: v is False, what="the valve safe")
        stalled_for = time.monotonic() - released
        assert stalled_for >= 0.9, f"the valve went safe {stalled_for:.2f} s in, before the grace"
        assert disk.free_bytes() == 0  # still full: the grace, not free space, switched it off
        assert outputs(agent.history())["valve"] == [False, True, False]
        info = agent.get("H1")
        assert info["status"] == "ACTIVE"  # stalled, not failed: the commit waits for space
        assert agent.steps("H1") == [
            ("Valve_On", "forward", "completed"),
            ("Hold", "forward", "started"),
        ]
        # the alert went straight to the broker (the outbox, in the database, cannot be written)
        alerts = mqtt.wait_for(
            mqtt.alerts, lambda got: any(a["alert"] == "disk_full" for a in got), "a disk alert"
        )
        alert = next(a for a in alerts if a["alert"] == "disk_full")
        assert alert["database"] == str(disk.path / "edgesaga.db")
        assert alert["seq"] is None  # never in the outbox
        # a command meanwhile gets the documented error, over the socket and MQTT, and creates nothing
        for refused in (
            agent.request("start", workflow_type="FsQuick", data={}),
            mqtt.command("start", workflow_type="FsQuick", data={}),
        ):
            assert refused["ok"] is False, refused
            assert refused["error"]["code"] == "disk_full", refused

        disk.free()
        agent.wait_status("H1", "COMPLETED", within=40)
        assert agent.steps("H1") == [
            ("Valve_On", "forward", "completed"),
            ("Hold", "forward", "completed"),
            ("Valve_Off", "forward", "completed"),
        ]
        assert outputs(agent.history())["valve"] == [False, True, False]  # never on again
        assert agent.steps("Q1") == QUICK_ROWS
        assert _ids(agent) == {"Q1", "H1"}  # the refused starts created nothing
        agent.start("FsQuick", workflow_id="Q2")  # work goes on
        agent.wait_status("Q2", "COMPLETED")
        agent.terminate()
        assert agent.wait_exit(within=15) == 0


# -- (c) an exception escaping a workflow's driver ---------------------------------------------------


INJECTED = "IntegrityError: UNIQUE constraint failed: journal.k (injected"


def _fault_handled(agent: FailSafeAgent, mqtt: MqttLog, workflow_id: str) -> None:
    """Once the injected exception has escaped the driver with the valve open: the valve goes
    safe with no one asking, an alert with the error is published, the log has the traceback."""
    agent.wait_log(INJECTED)
    poll(
        agent.history,
        lambda h: outputs(h)["valve"] == [False, True, False],
        what="the valve switched off",
    )
    alerts = mqtt.wait_for(
        mqtt.alerts,
        lambda got: any(a.get("workflow_id") == workflow_id for a in got),
        f"an alert about {workflow_id}",
    )
    alert = next(a for a in alerts if a.get("workflow_id") == workflow_id)
    assert alert["alert"] == "internal_error"
    assert INJECTED in alert["error"]
    assert "sqlite3." + INJECTED in agent.wait_log("Traceback (most recent call last)")


def test_an_exception_escaping_the_driver(tmp_path: Path, broker: Any, prefix: str) -> None:
    config = write_config(tmp_path, broker_port=broker.port, prefix=prefix)
    with mqtt_log(broker.port, prefix) as mqtt, failsafe_agent(config) as agent:
        mqtt.wait_availability(b"online")
        _quick(agent)
        agent.start("FsBroken", workflow_id="B1")  # Break_Store's result commit raises
        _fault_handled(agent, mqtt, "B1")
        # the workflow is FAILED at the step it was in, and the operator's retry finishes it
        info = agent.get("B1")
        assert info["status"] == "FAILED", info
        assert INJECTED in info["error"]
        reply = agent.request("retry", workflow_id="B1")
        assert reply["ok"], reply
        agent.wait_status("B1", "COMPLETED")
        assert agent.steps("B1") == [
            ("Valve_On", "forward", "completed"),
            ("Break_Store", "forward", "failed"),  # the attempt the exception ended
            ("Break_Store", "forward", "completed"),
            ("Valve_Off", "forward", "completed"),
        ]
        # retrying switched nothing on: Valve_On had completed and never runs again
        assert outputs(agent.history())["valve"] == [False, True, False]

        # the agent carries on: the same workflow runs again (the fault fires once) and ends
        agent.start("FsBroken", workflow_id="B2")
        agent.wait_status("B2", "COMPLETED")
        assert outputs(agent.history())["valve"] == [False, True, False, True, False]
        assert agent.steps("Q1") == QUICK_ROWS
        assert _ids(agent) == {"Q1", "B1", "B2"}
        agent.terminate()
        assert agent.wait_exit(within=15) == 0


def test_an_exception_escaping_the_driver_during_a_rollback(
    tmp_path: Path, broker: Any, prefix: str
) -> None:
    config = write_config(tmp_path, broker_port=broker.port, prefix=prefix)
    with mqtt_log(broker.port, prefix) as mqtt, failsafe_agent(config) as agent:
        mqtt.wait_availability(b"online")
        _quick(agent)
        agent.start("FsBrokenRollback", workflow_id="R1")  # Arm's compensation commit raises
        _fault_handled(agent, mqtt, "R1")
        # the rollback stopped where the exception struck: COMPENSATION_FAILED, retryable
        info = agent.get("R1")
        assert info["status"] == "COMPENSATION_FAILED", info
        assert INJECTED in info["error"]
        reply = agent.request("retry", workflow_id="R1")
        assert reply["ok"], reply
        agent.wait_status("R1", "FAILED_ROLLED_BACK")
        assert agent.steps("R1") == [
            ("Valve_On", "forward", "completed"),
            ("Arm", "forward", "completed"),
            ("Fail", "forward", "failed"),
            ("Arm", "compensate", "failed"),  # the attempt the exception ended
            ("Arm", "compensate", "completed"),
            ("Valve_On", "compensate", "completed"),
        ]
        assert outputs(agent.history())["valve"] == [False, True, False]
        assert agent.steps("Q1") == QUICK_ROWS
        assert _ids(agent) == {"Q1", "R1"}
        agent.terminate()
        assert agent.wait_exit(within=15) == 0


# -- (d) SIGKILL mid-step ------------------------------------------------------------------------------


def test_sigkill_mid_step(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with failsafe_agent(config) as agent:
        _quick(agent)
        _one_runs_one_waits(agent)
        agent.proc.send_signal(signal.SIGKILL)
        assert agent.wait_exit(within=10) == -signal.SIGKILL
    db = Path(agent.database)
    assert statuses(db) == {"Q1": "COMPLETED", "I1": "ACTIVE", "I2": "ACTIVE"}
    assert [o for s, _, _, o in journal(db, "I1")] == ["completed", "completed", "started"]
    assert journal(db, "I2") == []
    _restart_and_finish(config, "agent-restarted.log")
