"""``edgesaga run`` as a real subprocess: sd_notify (READY after recovery, watchdog, STOPPING),
SIGTERM with a grace period, outputs set safe, ``offline`` retained on the broker.

The agent runs as ``python -m agent run --config <tmp>/agent.yaml`` (the `edgesaga` command) with mock pins; the test
owns the ``NOTIFY_SOCKET`` datagram socket, exactly as systemd would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import SQLiteStore, WorkflowBuilder
from tests._broker import Broker, unique_prefix
from tests.flows.service.harness import (
    SERVICE_DEFS,
    AgentProcess,
    agent_process,
    journal,
    poll,
    retained,
    write_config,
)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes a test starts; every one is killed at teardown."""
    made: list[AgentProcess] = []
    yield made
    for agent in made:
        agent.kill()


def _status_counts(status_line: str) -> tuple[int, int]:
    match = re.search(r"running (\d+), queued (\d+)", status_line)
    assert match, status_line
    return int(match[1]), int(match[2])


async def _leave_a_crashed_workflow(database: Path) -> str:
    """An ACTIVE ServiceQuick whose first attempt is recorded as started and never finished: what a
    power cut in the middle of Step_One leaves behind."""
    async with SQLiteStore(database) as store:
        builder = WorkflowBuilder(definitions=[SERVICE_DEFS])
        wf = await builder.create_workflow("ServiceQuick", {}, store=store, begin=True)
        return wf.id


def _db_status(database: Path, workflow_id: str) -> str:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT status FROM instances WHERE id=?", (workflow_id,)).fetchone()[0]
    finally:
        conn.close()


def test_ready_after_recovery_then_watchdog_pings_and_a_blocked_loop_withholds_them(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    db = tmp_path / "state" / "edgesaga.db"
    crashed = asyncio.run(_leave_a_crashed_workflow(db))
    assert journal(db, crashed) == [("Step_One", "forward", 1, "started")]

    with agent_process(config, watchdog_usec=1_000_000) as agent:
        ready = agent.wait_ready()
        t_ready = agent.notify.times("READY")[0]
        # READY=1 carries the status at that moment: the crashed workflow was already recovered
        # and handed to the runner.
        running, queued = _status_counts(ready["STATUS"])
        assert running + queued == 1, ready
        # Recovery recorded the cut attempt as interrupted before READY (it is committed now).
        assert journal(db, crashed)[0] == ("Step_One", "forward", 1, "interrupted")
        log = agent.log_text()
        assert log.index("1 workflow(s) recovered") < log.index("agent svc-test ready"), log
        info = agent.wait_status(crashed, "COMPLETED")
        assert [(j["step"], j["attempt"], j["outcome"]) for j in info["journal"]] == [
            ("Step_One", 1, "interrupted"),
            ("Step_One", 2, "completed"),
            ("Step_Two", 1, "completed"),
        ]

        # WATCHDOG_USEC=1 s: a ping every 0.5 s while healthy, none before READY.
        time.sleep(max(0.0, t_ready + 2.2 - time.monotonic()))
        pings = agent.notify.times("WATCHDOG")
        assert all(t >= t_ready for t in pings)
        window = [t for t in pings if t_ready + 0.1 < t <= t_ready + 2.1]
        assert 3 <= len(window) <= 5, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 0.4 <= statistics.median(gaps) <= 0.6, gaps

        # A wedged event loop sends nothing: block it 1.5 s through the test hook.
        t_block = time.monotonic()
        assert agent.request("_block_loop", seconds=1.5) == {"ok": True}
        time.sleep(2.3)
        pings = agent.notify.times("WATCHDOG")
        during = [t for t in pings if t_block + 0.1 < t < t_block + 1.4]
        assert during == [], [round(t - t_block, 2) for t in pings]
        after = [t for t in pings if t >= t_block + 1.4]
        assert after, "the pings did not resume after the loop was unblocked"
        assert max(b - a for a, b in itertools.pairwise(pings)) >= 1.3

        agent.terminate()
        assert agent.wait_exit(10) == 0
        t_stop, _ = agent.notify.wait_for("STOPPING", within=1)
        assert t_stop > t_ready


async def test_sigterm_sets_outputs_safe_publishes_offline_and_exits_0(
    tmp_path: Path, broker: Broker
) -> None:
    prefix = unique_prefix()
    availability = f"{prefix}/svc-test/availability"
    config = write_config(
        tmp_path,
        grace_period=0.5,
        mqtt={"port": broker.port, "topic_prefix": prefix, "reconnect_max": 1.0},
    )
    record = tmp_path / "lamp-history.json"
    db = tmp_path / "state" / "edgesaga.db"
    with agent_process(config) as agent:
        await asyncio.to_thread(agent.wait_ready)
        await asyncio.to_thread(
            poll,
            lambda: agent.request("status"),
            lambda s: s["mqtt_connected"] is True,
            what="the agent to connect to the broker",
        )
        assert await asyncio.to_thread(retained, broker.port, availability) == {
            availability: b"online"
        }

        wid = agent.start("ServiceLamp", {"seconds": 30, "record": str(record)})
        await asyncio.to_thread(
            poll,
            lambda: agent.get(wid),
            lambda info: (
                info["current_step"] == "Hold" and info["journal"][-1]["outcome"] == "started"
            ),
            what="the workflow to hold the lamp on",
        )
        assert agent.request("pins")["pins"]["lamp"] is True

        agent.terminate()
        t0 = time.monotonic()
        code = await asyncio.to_thread(agent.wait_exit, 10)
        elapsed = time.monotonic() - t0
        assert code == 0, agent.log_text()
        assert elapsed <= 0.5 + 2.5, elapsed
        assert agent.notify.times("STOPPING"), agent.notify.snapshot()

    # The pin's whole history, written by an exit hook in the agent process: on while the
    # workflow held it, and off (its safe value) when the process ended.
    history = json.loads(record.read_text())
    assert history.count(True) >= 1, history  # it was on
    assert history[-1] is False, history
    # `offline` replaced `online` as the retained availability.
    assert await asyncio.to_thread(retained, broker.port, availability) == {
        availability: b"offline"
    }
    # The cut workflow stays ACTIVE for recovery; it was not failed or cancelled by the stop.
    assert _db_status(db, wid) == "ACTIVE"
    assert "Traceback" not in agent.log_text()


def test_sigterm_during_a_long_step_exits_within_the_grace_period_and_the_step_reruns(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    config = write_config(tmp_path, grace_period=2)
    marker = tmp_path / "long-step-started"
    db = tmp_path / "state" / "edgesaga.db"

    first = AgentProcess(config)
    agents.append(first)
    first.wait_ready()
    wid = first.start("ServiceLong", {"seconds": 10, "marker": str(marker)})
    poll(marker.exists, bool, what="the 10-second step to start")

    first.terminate()
    t0 = time.monotonic()
    code = first.wait_exit(10)
    elapsed = time.monotonic() - t0
    assert code == 0, first.log_text()
    assert elapsed <= 2 + 1, f"exited {elapsed:.2f} s after SIGTERM with grace_period 2"
    assert elapsed >= 1.8, f"exited after {elapsed:.2f} s: the step did not get its grace period"
    assert first.notify.times("STOPPING")
    # Left for recovery: still ACTIVE, its attempt still only "started".
    assert _db_status(db, wid) == "ACTIVE"
    assert journal(db, wid) == [("Long_Sleep", "forward", 1, "started")]

    second = AgentProcess(config, log_name="agent-restart.log")
    agents.append(second)
    second.wait_ready()
    info = second.wait_status(wid, "COMPLETED", within=5)
    assert journal(db, wid) == [
        ("Long_Sleep", "forward", 1, "interrupted"),
        ("Long_Sleep", "forward", 2, "completed"),
    ]
    assert info["state"]["done"] == ["Long_Sleep#2"]
    second.terminate()
    assert second.wait_exit(10) == 0


async def test_sigkill_of_edgesaga_run_makes_the_broker_publish_offline(
    tmp_path: Path, broker: Broker
) -> None:
    """The real agent process (not a harness) dies without a word: the broker's last will says
    `offline`, retained, to whoever asks later."""
    prefix = unique_prefix()
    availability = f"{prefix}/svc-test/availability"
    config = write_config(
        tmp_path, mqtt={"port": broker.port, "topic_prefix": prefix, "reconnect_max": 1.0}
    )
    with agent_process(config) as agent:
        await asyncio.to_thread(agent.wait_ready)
        await asyncio.to_thread(
            poll,
            lambda: agent.request("status"),
            lambda s: s["mqtt_connected"] is True,
            what="the agent to connect to the broker",
        )
        assert await asyncio.to_thread(retained, broker.port, availability) == {
            availability: b"online"
        }
        agent.kill()
        assert await asyncio.to_thread(agent.wait_exit, 10) == -9

    def offline() -> dict[str, bytes]:
        return retained(broker.port, availability)

    assert await asyncio.to_thread(
        poll, offline, lambda got: got == {availability: b"offline"}, what="the last will"
    ) == {availability: b"offline"}


async def _leave_paused_workflows(database: Path, count: int) -> None:
    """``count`` workflows PAUSED in the database (as a HUMAN_INPUT step will leave them)."""
    async with SQLiteStore(database) as store:
        builder = WorkflowBuilder(definitions=[SERVICE_DEFS])
        ids = [
            (await builder.create_workflow("ServiceQuick", {}, store=store)).id
            for _ in range(count)
        ]
    conn = sqlite3.connect(database)
    try:
        conn.executemany("UPDATE instances SET status='PAUSED' WHERE id=?", [(i,) for i in ids])
        conn.commit()
    finally:
        conn.close()


def test_the_status_text_counts_the_paused_workflows(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    asyncio.run(_leave_paused_workflows(tmp_path / "state" / "edgesaga.db", 2))
    with agent_process(config) as agent:
        ready = agent.wait_ready()
        assert "paused 2" in ready["STATUS"], (
            ready
        )  # it said "paused 0", whatever the database held
        assert agent.request("status")["counts"]["PAUSED"] == 2
