"""Durable time through a whole agent (DESIGN §11): real ``edgesaga run`` processes, SIGKILLed in
the middle of a DELAY, restarted over the same SQLite file, some under libfaketime with the wall
clock a day ahead (``FAKETIME_DONT_FAKE_MONOTONIC=1`` leaves ``CLOCK_MONOTONIC`` and
``CLOCK_BOOTTIME`` real, as a restart on the same boot does).

A step of the test workflow writes ``time.monotonic()`` (the system-wide clock, the same in the
agent and in this process, and not faked) to a file when it runs, so "not before" is measured on
one clock that never jumps. No test asserts how fast anything is: only that nothing fires early.

A reboot (another kernel boot id) cannot be made here: the clock reads the boot id from the
kernel, so the reboot rules are covered with the injected clock (``FakeClock.reboot``) in
tests/test_delay.py and tests/test_timers.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent._socket import request
from tests._faketime import FakeTime, faketime_lib

__all__ = ["faketime_lib"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]

STEPS = '''\
"""Steps of the time tests: each writes time.monotonic() to the file named by its param."""
import os
import time

from pydantic import BaseModel


class TimeState(BaseModel):
    pass


async def stamp(state, context, path):
    with open(path, "a") as f:
        f.write(f"{time.monotonic()!r}\\n")
        f.flush()
        os.fsync(f.fileno())
    return {}
'''

DELAY_FLOW = """\
workflow_type: TimedWait
workflow_version: "1.0.0"
initial_state_model: time_steps.TimeState
steps:
  - name: Before
    function: time_steps.stamp
    params: {path: BEFORE}
  - name: Wait
    type: DELAY
    duration: 3
    on_late: fail          # judged late (it was not), the run would fail
  - name: After
    function: time_steps.stamp
    params: {path: AFTER}
"""


class AgentProcess:
    """``edgesaga run`` over one config; started and SIGKILLed as the test says."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp_path
        self.sock = tmp_path / "control.sock"
        self.log = tmp_path / "agent.log"
        self.cfg = tmp_path / "agent.yaml"
        self.cfg.write_text(
            json.dumps(
                {
                    "device_id": "time-test",
                    "database": str(tmp_path / "db" / "edgesaga.db"),
                    "control_socket": str(self.sock),
                    "python_path": [str(tmp_path)],
                    "include_bundled": False,
                    "logging": {"level": "INFO"},
                    "mqtt": {"enabled": False},
                    # the agent's clock counts as synchronized: the wall rules would apply if
                    # the same-boot rule did not come first
                    "clock": {"assume_synchronized": True},
                    **config,
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra_env: dict[str, str] | None = None) -> float:
        """Start the agent; returns time.monotonic() just before its exec."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
        env.pop("NOTIFY_SOCKET", None)
        t = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent._cli", "run", "--config", str(self.cfg)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self.ask("status"), 30, "the agent's control socket", self)
        return t

    def ask(self, command: str, **fields: Any) -> dict[str, Any] | None:
        try:
            return request(self.sock, command, timeout=5, **fields)
        except OSError:
            return None

    def kill(self) -> float:
        """SIGKILL; returns time.monotonic() when the signal was sent."""
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def workflow(self, wid: str) -> dict[str, Any]:
        got = self.ask("get", request_id="g", workflow_id=wid)
        assert got is not None
        assert got.get("ok"), got
        return got


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, agent: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if agent is not None and agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(
                f"the agent exited while waiting for {what}: {agent.log.read_text()}"
            )
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ended(agent: Any, wid: str) -> dict[str, Any]:
    """The workflow ``wid`` as the agent shows it once its run has ended (within 30 s)."""
    done: dict[str, Any] = wait_for(
        lambda: (w := agent.workflow(wid))["status"] not in ("ACTIVE", "COMPENSATING") and w,
        30,
        "the run to end",
    )
    return done


def stamps(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture
def delay_agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path, Path]]:
    defs = tmp_path / "defs"
    defs.mkdir()
    before, after = tmp_path / "before.txt", tmp_path / "after.txt"
    (tmp_path / "time_steps.py").write_text(STEPS)
    (defs / "timed_wait.yaml").write_text(
        DELAY_FLOW.replace("BEFORE", str(before)).replace("AFTER", str(after))
    )
    agent = AgentProcess(tmp_path, {"definitions": [str(defs)]})
    try:
        yield agent, before, after
    finally:
        agent.stop()


def _interrupted_delay(
    agent: AgentProcess, before: Path, after: Path, restart_env: dict[str, str] | None
) -> tuple[float, float, float, dict[str, Any]]:
    """Start TimedWait, SIGKILL the agent 1 s into its 3 s DELAY, restart it with
    ``restart_env``; returns (DELAY begun no earlier than, killed at, After ran at, workflow)."""
    agent.start()
    reply = agent.ask("start", request_id="r1", workflow_type="TimedWait")
    assert reply is not None
    assert reply["ok"], reply
    wid = reply["workflow_id"]
    armed = wait_for(lambda: stamps(before), 10, "the Before step")[0]
    wait_for(lambda: agent.workflow(wid)["current_step"] == "Wait", 10, "the DELAY to begin")
    time.sleep(max(0.0, armed + 1.0 - time.monotonic()))
    killed = agent.kill()
    assert stamps(after) == []  # killed inside the DELAY
    agent.start(restart_env)
    done = ended(agent, wid)
    assert done["status"] == "COMPLETED", done
    fired = stamps(after)
    assert len(fired) == 1  # After ran once
    return armed, killed, fired[0], done


def test_a_delay_cut_by_sigkill_waits_its_remaining_time_after_the_restart(delay_agent) -> None:
    agent, before, after = delay_agent
    armed, killed, fired, wf = _interrupted_delay(agent, before, after, None)
    # The DELAY began after Before's stamp and lasts 3 s: 2 s of it were left at the SIGKILL.
    assert fired - armed >= 3.0
    assert fired - killed >= 3.0 - (killed - armed)
    assert wf["status"] == "COMPLETED", wf
    steps = [(j["step"], j["outcome"]) for j in wf["journal"]]
    # nothing before the DELAY ran again
    assert steps == [("Before", "completed"), ("After", "completed")]


def test_a_wall_clock_a_day_ahead_at_the_restart_does_not_end_the_delay_early(
    delay_agent, faketime_lib: Path, tmp_path: Path
) -> None:
    agent, before, after = delay_agent
    # The restarted agent's wall clock is a day ahead (the board's NTP stepped it, say); the
    # boot-time clock it waits on is the same as before the SIGKILL.
    fake = FakeTime(faketime_lib, tmp_path)
    fake.set(datetime.now(UTC) + timedelta(days=1))
    armed, killed, fired, wf = _interrupted_delay(agent, before, after, fake.env())
    assert fired - armed >= 3.0
    assert fired - killed >= 3.0 - (killed - armed)
    # Not Late either (its on_late is fail): by the clock the same boot waits on, the deadline
    # had not passed when the agent came back.
    assert wf["status"] == "COMPLETED", wf


# -- the irrigation job: SIGKILL with the pump on ------------------------------------------------

GARDEN = {
    "pin_factory": "mock",
    "devices": {
        "valve": {"kind": "output", "pin": 17, "safe": False},
        "pump": {"kind": "output", "pin": 27, "safe": False},
        "level": {"kind": "input", "pin": 22, "pull_up": True},
        "soil": {"kind": "input", "pin": 23, "pull_up": False},
    },
}


@pytest.fixture
def job_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """An agent running DailyIrrigation (daily.yaml, its Soak compressed and its keys changed
    as a test says) on mock pins."""
    from workflows.irrigation import demo

    made: list[AgentProcess] = []

    def make(soak: float, **replace: str) -> AgentProcess:
        defs = tmp_path / "defs"
        defs.mkdir()
        text = demo.job_definition(soak)
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        (defs / "daily.yaml").write_text(text)
        agent = AgentProcess(tmp_path, {"definitions": [str(defs)], "hardware": GARDEN})
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            agent.stop()


def _kill_while_soaking(agent: AgentProcess) -> str:
    """Start the job on dry soil; SIGKILL the agent once it soaks with the pump on."""
    agent.start()
    assert agent.ask("set_input", device="soil", value=True) is not None
    reply = agent.ask("start", request_id="r1", workflow_type="DailyIrrigation")
    assert reply is not None
    assert reply["ok"], reply
    wid = reply["workflow_id"]
    wait_for(lambda: agent.workflow(wid)["current_step"] == "Soak", 10, "the Soak", agent)
    pins = agent.ask("pins")
    assert pins is not None
    assert (pins["pins"]["pump"], pins["pins"]["valve"]) == (True, True)
    agent.kill()
    return wid


def _ended(agent: AgentProcess, wid: str) -> dict[str, Any]:
    return wait_for(
        lambda: (w := agent.workflow(wid))["status"] not in ("ACTIVE", "COMPENSATING") and w,
        30,
        "the recovered job to end",
        agent,
    )


def _history(agent: AgentProcess) -> dict[str, list[bool]]:
    got = agent.ask("pins", history=True)
    assert got is not None
    return {name: [bool(v) for v in states] for name, states in got["history"].items()}


def _safe_before_recovery(agent: AgentProcess) -> None:
    text = agent.log.read_text()
    second_run = text[text.rindex("outputs set to their safe values") :]
    assert "recovered" in second_run  # safe outputs came before recovery in the restarted agent


def test_the_job_killed_with_the_pump_on_is_rolled_back_with_the_pump_left_off(
    job_agent,
) -> None:
    agent = job_agent(30)  # the bundled rule: on_restart: rollback
    wid = _kill_while_soaking(agent)
    agent.start()
    wf = _ended(agent, wid)
    assert wf["status"] == "FAILED_ROLLED_BACK", wf
    # the restarted agent's pins: opened at their safe values, never switched on again (the
    # compensations find them off already)
    history = _history(agent)
    assert history["pump"] == [False]
    assert history["valve"] == [False]
    _safe_before_recovery(agent)
    assert [(j["step"], j["phase"], j["outcome"]) for j in wf["journal"]] == [
        ("Check_Soil", "forward", "completed"),
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Start_Pump", "compensate", "completed"),
        ("Open_Valve", "compensate", "completed"),
    ]


def test_the_job_with_restore_switches_valve_and_pump_back_on_and_finishes(job_agent) -> None:
    agent = job_agent(3, **{"on_restart: rollback": "on_restart: restore"})
    wid = _kill_while_soaking(agent)
    agent.start()
    # restored before the Soak goes on: valve then pump, the order the steps commanded them
    wait_for(lambda: _history(agent)["pump"] == [False, True], 10, "the pump restored", agent)
    assert _history(agent)["valve"] == [False, True]
    assert agent.workflow(wid)["status"] == "ACTIVE"
    assert agent.ask("set_input", device="level", value=True) is not None
    wf = _ended(agent, wid)
    assert wf["status"] == "COMPLETED", wf
    history = _history(agent)
    assert history["pump"] == [False, True, False]
    assert history["valve"] == [False, True, False]
    _safe_before_recovery(agent)
    steps = [(j["step"], j["outcome"]) for j in wf["journal"]]
    assert steps == [
        ("Check_Soil", "completed"),
        ("Open_Valve", "completed"),
        ("Start_Pump", "completed"),
        ("Wait_For_Level", "completed"),
        ("Stop_Pump", "completed"),
        ("Close_Valve", "completed"),
    ]


def test_the_job_with_restore_after_a_long_outage_misses_its_deadline_and_rolls_back(
    job_agent,
) -> None:
    # the Soak's end passes while the agent is down; on_late run goes on, but the level wait may
    # start at most 1 s after the Soak was due: the outage is longer, so it does not run
    agent = job_agent(
        1,
        **{
            "on_restart: rollback": "on_restart: restore",
            "on_late: fail": "on_late: run",
            "  - name: Wait_For_Level\n": "  - name: Wait_For_Level\n    max_lateness: 1\n",
        },
    )
    wid = _kill_while_soaking(agent)
    time.sleep(3.0)  # the outage: the Soak (1 s) ended meanwhile, 2 s more
    agent.start()
    wf = _ended(agent, wid)
    assert wf["status"] == "FAILED_ROLLED_BACK", wf
    assert "max_lateness" in (wf.get("error") or ""), wf
    assert [(j["step"], j["phase"], j["outcome"]) for j in wf["journal"]] == [
        ("Check_Soil", "forward", "completed"),
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Start_Pump", "compensate", "completed"),
        ("Open_Valve", "compensate", "completed"),
    ]
    # restored at start (the rule), then undone by the rollback the missed deadline began
    history = _history(agent)
    assert history["pump"] == [False, True, False]
    assert history["valve"] == [False, True, False]
