"""A schedule in a real ``edgesaga run`` process whose wall clock libfaketime sets and moves
(DESIGN §11): it fires once at its slot, not before the clock's sync file exists, not again
after a SIGKILL and a restart, and not again after the wall clock is moved back over the slot.

The monotonic clock stays real (``FAKETIME_DONT_FAKE_MONOTONIC=1``): the agent sleeps on it and
reads the wall clock when it wakes, as on a board whose clock NTP steps.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests._faketime import FakeTime, faketime_lib
from tests.flows.service.harness import AgentProcess, agent_process, poll, write_config

__all__ = ["faketime_lib"]  # the fixture, imported for pytest

SLOT = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
SLOT_KEY = "2026-12-02T06:00:00Z"


def _utc(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def faked(faketime_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """A faked wall clock for the agent processes this test starts (they inherit it)."""
    fake = FakeTime(faketime_lib, tmp_path)
    fake.set(datetime(2026, 12, 2, 5, 59, 57, tzinfo=UTC))
    for name, value in fake.env().items():
        monkeypatch.setenv(name, value)
    return fake


def _schedule(agent: AgentProcess) -> dict[str, Any]:
    reply = agent.request("schedules")
    assert reply["ok"], reply
    (row,) = reply["schedules"]
    return dict(row)


def _checked_after(agent: AgentProcess, when: datetime, within: float = 20.0) -> dict[str, Any]:
    """The schedule's row once the scheduler has looked at the clock after ``when``."""

    def checked(row: dict[str, Any]) -> bool:
        at = _utc(row["checked_at"])
        return at is not None and at > when

    return dict(
        poll(lambda: _schedule(agent), checked, within=within, interval=0.2, what="a check")
    )


def _workflows(agent: AgentProcess) -> list[dict[str, Any]]:
    reply = agent.request("list")
    assert reply["ok"], reply
    return list(reply["workflows"])


def test_a_schedule_fires_once_under_a_faked_clock_across_sync_kill_and_jump_back(
    faked: FakeTime, tmp_path: Path
) -> None:
    synced = tmp_path / "synchronized"
    config = write_config(
        tmp_path,
        clock={"sync_file": str(synced)},
        schedules=[
            {
                "name": "morning",
                "workflow_type": "ServiceQuick",
                "cron": "0 6 * * *",
                "timezone": "UTC",
                "missed": "run_once",
            }
        ],
    )
    with agent_process(config) as agent:
        ready = agent.wait_ready()
        assert ready["STATUS"].endswith(", clock not synced (0 timer(s) wait for it)"), ready
        status = agent.request("status")
        assert status["clock_synchronized"] is False
        assert status["timers_waiting_on_sync"] == 0
        # The slot passes on an unsynchronized clock: nothing fires.
        row = _checked_after(agent, SLOT)
        assert row["waits_for_clock_sync"] is True
        assert row["next_fire"] is None
        assert row["last_run"] is None
        assert _workflows(agent) == []
        # The clock syncs while the slot is still on time: it fires, once.
        synced.touch()
        row = poll(
            lambda: _schedule(agent),
            lambda r: r["last_run"] is not None,
            within=15,
            interval=0.2,
            what="the fire",
        )
        assert row["last_run"]["slot_utc"] == SLOT_KEY
        wid = row["last_run"]["workflow_id"]
        agent.wait_status(wid, "COMPLETED")
        assert agent.request("status")["clock_synchronized"] is True
        agent.proc.kill()  # SIGKILL
        agent.wait_exit()

    with agent_process(config, log_name="agent2.log") as agent:
        agent.wait_ready()
        row = _checked_after(agent, SLOT.replace(second=5))
        assert row["last_run"]["workflow_id"] == wid
        assert [w["workflow_id"] for w in _workflows(agent)] == [wid]
        assert row["next_fire_utc"] == "2026-12-03T06:00:00Z"

        # NTP steps the clock back over the fired slot: 06:00 passes a second time, nothing fires.
        faked.set(datetime(2026, 12, 2, 5, 59, 48, tzinfo=UTC))  # checks 5 s apart
        poll(
            lambda: _utc(_schedule(agent)["checked_at"]),
            lambda at: at is not None and at < SLOT,
            within=15,
            interval=0.2,
            what="a check before the slot after the jump back",
        )
        row = _checked_after(agent, SLOT.replace(second=1))
        assert row["last_run"]["workflow_id"] == wid
        assert [w["workflow_id"] for w in _workflows(agent)] == [wid]
        assert row["next_fire_utc"] == "2026-12-03T06:00:00Z"
