"""The agent's scheduler (DESIGN §11) over a real SQLite file, with an injected clock: each fire
is a start through the operator path, recorded in the transaction that creates the workflow.

The workflows a fire starts are handed to a driver that only collects them (they stay ACTIVE:
an unfinished previous run) unless a test runs them to the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import SQLiteStore, WorkflowStatus
from agent._clock import FakeClock
from agent._config import ConfigError, load_config
from agent._control import Control
from agent._definition import load_definition
from agent._engine import Workflow, WorkflowBuilder
from agent._scheduler import Scheduler
from agent._schedules import ScheduleConfig
from agent._store import NewInstance, Transition
from agent._validate import check_definitions
from tests._engine_fixtures import step, write_definition


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Collect:
    """A driver that keeps what it is handed (the runner's place)."""

    def __init__(self) -> None:
        self.handed: list[Workflow] = []

    @property
    def running(self) -> int:
        return 0

    @property
    def queued(self) -> int:
        return len(self.handed)

    def submit(self, workflow: Workflow) -> bool:
        self.handed.append(workflow)
        return True


class Agent:
    """The parts of an agent the scheduler uses, over one database file."""

    def __init__(self, tmp_path: Path, clock: FakeClock, schedules: list[ScheduleConfig]) -> None:
        self.db = tmp_path / "edgesaga.db"
        self.clock = clock
        self.schedules = schedules
        self.definition = write_definition(tmp_path, [step("One", "record")])

    async def open(self) -> Scheduler:
        self.store = SQLiteStore(self.db)
        await self.store.open()
        self.builder = WorkflowBuilder()
        self.builder.add_definition(load_definition(self.definition))
        self.driver = Collect()
        self.control = Control(
            builder=self.builder,
            store=self.store,
            runner=self.driver,
            clock=self.clock,
            schedules=self.schedules,
        )
        self.scheduler = Scheduler(
            self.schedules, store=self.store, clock=self.clock, fire=self.control.fire_schedule
        )
        return self.scheduler

    async def close(self) -> None:
        await self.store.close()

    async def rows(self) -> list[tuple[str, str, str]]:
        def fn(conn: Any) -> list[tuple[str, str, str]]:
            return conn.execute(
                "SELECT schedule, slot, workflow_id FROM schedule_fires ORDER BY schedule, slot"
            ).fetchall()

        return await self.store.query(fn)

    async def instances(self) -> int:
        return sum((await self.store.count_by_status()).values())


def daily(**kw: Any) -> ScheduleConfig:
    fields: dict[str, Any] = {
        "name": "water",
        "workflow_type": "EngineTest",
        "cron": "0 6 * * *",
        "timezone": "UTC",
        **kw,
    }
    return ScheduleConfig(**fields)


@pytest.fixture
async def agent(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Agent]:
    schedules = getattr(request, "param", None) or [daily()]
    a = Agent(tmp_path, FakeClock(wall=_at("2026-12-02T05:59:00")), schedules)
    await a.open()
    yield a
    await a.close()


async def test_a_slot_fires_once_on_time_and_the_fire_is_recorded_with_its_workflow(
    agent: Agent,
) -> None:
    agent.clock.set(wall=_at("2026-12-02T05:59:59.5"))
    assert await agent.scheduler.tick() == []
    assert 0.4 < await agent.scheduler.delay() <= 0.5  # it sleeps until the slot
    agent.clock.set(wall=_at("2026-12-02T06:00:00.01"))
    (fired,) = await agent.scheduler.tick()
    assert fired.slot == "2026-12-02T06:00:00Z"
    assert fired.reply["ok"] is True
    wid = fired.reply["workflow_id"]
    assert await agent.rows() == [("water", "2026-12-02T06:00:00Z", wid)]
    record = await agent.store.load_instance(wid)
    assert record is not None
    assert record.workflow_type == "EngineTest"
    assert [w.id for w in agent.driver.handed] == [wid]  # handed to the runner, as a start
    agent.clock.advance(30)
    assert await agent.scheduler.tick() == []  # the same slot never again
    assert await agent.instances() == 1
    assert await agent.scheduler.delay() == agent.scheduler.max_sleep  # tomorrow is far off


async def test_nothing_fires_before_the_clock_is_synchronized(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:10"), synchronized=False)
    assert await agent.scheduler.tick() == []
    assert await agent.scheduler.delay() == agent.scheduler.sync_poll
    assert await agent.instances() == 0
    agent.clock.set(wall=_at("2026-12-02T06:00:30"), synchronized=True)  # synced, still on time
    (fired,) = await agent.scheduler.tick()
    assert fired.slot == "2026-12-02T06:00:00Z"


@pytest.mark.parametrize("agent", [[daily(missed="run_once")]], indirect=True)
async def test_run_once_starts_one_run_for_all_the_slots_an_outage_missed(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:01"))
    await agent.scheduler.tick()
    await agent.driver.handed[0].run()  # finished: no overlap in the way
    agent.clock.set(wall=_at("2026-12-05T07:30:00"))  # down over three slots
    (fired,) = await agent.scheduler.tick()
    assert fired.slot == "2026-12-05T06:00:00Z"  # one run, for the latest
    assert await agent.scheduler.tick() == []
    assert [slot for _, slot, _ in await agent.rows()] == ["2026-12-05T06:00:00Z"]
    assert await agent.instances() == 2


async def test_skip_starts_none_of_the_slots_an_outage_missed(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:01"))
    await agent.scheduler.tick()
    await agent.driver.handed[0].run()
    agent.clock.set(wall=_at("2026-12-05T07:30:00"))
    assert await agent.scheduler.tick() == []
    assert await agent.instances() == 1
    agent.clock.set(wall=_at("2026-12-06T06:00:00.5"))
    (fired,) = await agent.scheduler.tick()  # the next slot is on time again
    assert fired.slot == "2026-12-06T06:00:00Z"


@pytest.mark.parametrize("agent", [[daily(missed="run_once")]], indirect=True)
async def test_a_slot_never_fires_twice_across_a_restart(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:00.5"))
    (first,) = await agent.scheduler.tick()
    await agent.close()
    again = await agent.open()  # a new agent over the same file; the run is still unfinished
    await agent.builder.load_workflow(first.reply["workflow_id"], agent.store)
    agent.clock.advance(5)
    assert await again.tick() == []
    # Even a scheduler that would fire it again (no overlap rule, no knowledge of the fire)
    # creates nothing: the request id finds the first answer, and the store refuses the slot.
    assert (await agent.control.fire_schedule(daily(), first.slot))["workflow_id"] == first.reply[
        "workflow_id"
    ]
    assert await agent.instances() == 1
    assert len(await agent.rows()) == 1


@pytest.mark.parametrize("agent", [[daily(missed="run_once")]], indirect=True)
async def test_a_clock_jump_back_over_a_fired_slot_fires_nothing(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:00.5"))
    (fired,) = await agent.scheduler.tick()
    await agent.driver.handed[0].run()
    agent.clock.jump_wall(-3600)  # NTP steps it back an hour: 05:00 again
    assert await agent.scheduler.tick() == []
    assert await agent.scheduler.delay() == agent.scheduler.max_sleep  # not at 06:00 again
    agent.clock.advance(3600.5)  # through 06:00 a second time
    assert await agent.scheduler.tick() == []
    assert await agent.instances() == 1
    assert [slot for _, slot, _ in await agent.rows()] == [fired.slot]


async def test_the_store_refuses_a_fire_at_or_before_the_latest_one(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:00.5"))
    await agent.scheduler.tick()
    definition = agent.builder.definition("EngineTest")
    for slot in ("2026-12-02T06:00:00Z", "2026-12-01T06:00:00Z"):  # the same, and an earlier one
        wid = f"other-{slot}"
        new = NewInstance(
            id=wid,
            workflow_type="EngineTest",
            workflow_version=definition.version,
            definition_hash=definition.hash,
            definition=definition.snapshot,
            first=_first(wid),
            fire=("water", slot),
        )
        assert await agent.store.create_instance(new) is False
        assert await agent.store.load_instance(wid) is None
    assert len(await agent.rows()) == 1
    assert await agent.instances() == 1


def _first(wid: str) -> Transition:
    return Transition(
        workflow_id=wid,
        status=WorkflowStatus.ACTIVE,
        current_step="One",
        error=None,
        state_json="{}",
        progress_json="{}",
        at=1.0,
        journal=(),
        events=[],
    )


EVERY_MINUTE = {"cron": "* * * * *", "name": "tick"}


@pytest.mark.parametrize("agent", [[daily(**EVERY_MINUTE)]], indirect=True)
async def test_overlap_skip_starts_nothing_while_the_previous_run_is_unfinished(
    agent: Agent,
) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:00.5"))
    (first,) = await agent.scheduler.tick()
    agent.clock.set(wall=_at("2026-12-02T06:01:00.5"))
    assert await agent.scheduler.tick() == []  # the 06:00 run is still ACTIVE
    await agent.driver.handed[0].run()
    agent.clock.set(wall=_at("2026-12-02T06:02:00.5"))
    (second,) = await agent.scheduler.tick()
    assert second.slot == "2026-12-02T06:02:00Z"
    assert first.reply["workflow_id"] != second.reply["workflow_id"]


@pytest.mark.parametrize("agent", [[daily(overlap="allow", **EVERY_MINUTE)]], indirect=True)
async def test_overlap_allow_starts_the_next_run_beside_the_unfinished_one(agent: Agent) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:00.5"))
    await agent.scheduler.tick()
    agent.clock.set(wall=_at("2026-12-02T06:01:00.5"))
    (fired,) = await agent.scheduler.tick()
    assert fired.slot == "2026-12-02T06:01:00Z"
    assert (await agent.store.count_by_status())[WorkflowStatus.ACTIVE.value] == 2


@pytest.mark.parametrize(
    "agent", [[daily(workflow_type="NoSuchType", missed="run_once")]], indirect=True
)
async def test_a_refused_start_is_logged_once_per_slot_not_retried_at_every_wake(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.clock.set(wall=_at("2026-12-02T06:00:00.5"))
    (fired,) = await agent.scheduler.tick()
    assert fired.reply["ok"] is False
    assert fired.reply["error"]["code"] == "unknown_workflow_type"
    agent.clock.advance(10)
    assert await agent.scheduler.tick() == []
    assert await agent.rows() == []
    assert sum("started nothing" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("agent", [[daily(timezone="Europe/Berlin")]], indirect=True)
async def test_the_listing_names_the_next_fire_in_its_zone_and_utc_and_the_last_run(
    agent: Agent,
) -> None:
    agent.clock.set(wall=_at("2026-12-02T05:00:00.5"))  # 06:00 in Berlin (UTC+1 in winter)
    (fired,) = await agent.scheduler.tick()
    reply = await agent.control.execute(_schedules_command())
    (row,) = reply["schedules"]
    assert row["next_fire"] == "2026-12-03T06:00:00+01:00"
    assert row["next_fire_utc"] == "2026-12-03T05:00:00Z"
    assert row["last_run"] == {
        "slot": "2026-12-02T06:00:00+01:00",
        "slot_utc": "2026-12-02T05:00:00Z",
        "workflow_id": fired.reply["workflow_id"],
        "status": "ACTIVE",
    }
    assert row["waits_for_clock_sync"] is False
    agent.clock.set(synchronized=False)
    (row,) = (await agent.control.execute(_schedules_command()))["schedules"]
    assert row["next_fire"] is None
    assert row["waits_for_clock_sync"] is True


def _schedules_command() -> Any:
    from agent._commands import parse_command

    return parse_command("schedules", b'{"request_id": "r-1"}')


def _config(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def test_validate_names_a_schedule_whose_type_or_data_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "defs").mkdir()
    write_definition(tmp_path / "defs", [step("One", "record")])
    cfg = load_config(
        _config(
            tmp_path,
            {
                "database": "db/edgesaga.db",
                "definitions": ["defs"],
                "include_bundled": False,
                "schedules": [
                    {
                        "name": "ok",
                        "workflow_type": "EngineTest",
                        "cron": "0 6 * * *",
                        "timezone": "UTC",
                        "data": {"count": 2},
                    },
                    {
                        "name": "typo",
                        "workflow_type": "EngineTset",
                        "cron": "0 6 * * *",
                        "timezone": "UTC",
                    },
                    {
                        "name": "bad-data",
                        "workflow_type": "EngineTest",
                        "cron": "0 6 * * *",
                        "timezone": "UTC",
                        "data": {"count": "many", "colour": 1},
                    },
                ],
            },
        )
    )
    problems = [str(p) for p in check_definitions(config=cfg).all_problems()]
    assert len(problems) == 2, problems
    assert problems[0].startswith("schedule 'typo' starts workflow type 'EngineTset', which no")
    assert problems[1].startswith("schedule 'bad-data' has data that does not fit:")
    assert "colour" in problems[1]
    assert all(p.endswith(".") and ".." not in p and "\n" not in p for p in problems)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"mqtt": {"tls": {"key_file": "k.pem"}}},
            "mqtt.tls: mqtt.tls.key_file is set without mqtt.tls.cert_file; set both or neither.",
        ),
        (
            {"mqtt": {"topic_prefix": "a/#"}},
            "mqtt.topic_prefix: mqtt.topic_prefix must not contain '+', '#' or NUL, nor start "
            "or end with '/'.",
        ),
        (
            {
                "schedules": [
                    {"name": "a", "workflow_type": "X", "cron": "0 6 * *", "timezone": "UTC"}
                ]
            },
            "schedules.0.cron: schedule 'a' has the cron expression '0 6 * *', which cronsim "
            "cannot read (wrong number of fields); write five fields such as '0 6 * * *'.",
        ),
        (
            {"clock": {"sync_file": ""}},
            "clock.sync_file: String should have at least 1 character.",
        ),
    ],
)
def test_a_config_error_is_one_clean_sentence(
    tmp_path: Path, body: dict[str, Any], expected: str
) -> None:
    path = _config(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value) == f"{path}: {expected}"
