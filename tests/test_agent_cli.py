"""The ``edgesaga`` command line as a user runs it (subprocesses with ``--config``): against a
running agent (through its control socket) and without one (in-process, on the database)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.flows.service.harness import (
    ROOT,
    SERVICE_DEFS,
    AgentProcess,
    base_env,
    cli,
    journal,
    poll,
    write_config,
)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"rc {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def _show(config: Path, workflow_id: str) -> dict[str, Any]:
    info = json.loads(_ok(cli(config, "show", workflow_id, "--json")))
    assert isinstance(info, dict)
    return info


def _wait_status(
    config: Path, workflow_id: str, *statuses: str, within: float = 10
) -> dict[str, Any]:
    return poll(
        lambda: _show(config, workflow_id),
        lambda info: info["status"] in statuses,
        within=within,
        interval=0.1,
        what=f"{workflow_id} to reach {statuses}",
    )


# ------------------------------------------------------------------------------------------------
# Against a running agent


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, AgentProcess]]:
    """One agent for this module's tests, started without the test hooks."""
    directory = tmp_path_factory.mktemp("cli-agent")
    config = write_config(directory)
    agent = AgentProcess(config, test_hooks=False)
    try:
        agent.wait_ready()
        yield config, agent
    finally:
        agent.kill()


def test_start_list_show_through_the_agent(running: tuple[Path, AgentProcess]) -> None:
    config, _ = running
    reply = json.loads(_ok(cli(config, "start", "ServiceQuick", "--data", '{"seconds": 1}')))
    # The agent's reply (the CLI's request id), sent before the agent ran any step; an in-process
    # start would have printed the finished workflow instead.
    assert reply["ok"] is True
    assert reply["request_id"].startswith("cli-")
    assert reply["status"] == "ACTIVE"
    wid = reply["workflow_id"]
    info = _wait_status(config, wid, "COMPLETED")
    assert info["state"]["done"] == ["Step_One", "Step_Two"]

    table = _ok(cli(config, "list"))
    line = next(row for row in table.splitlines() if row.startswith(wid))
    assert "ServiceQuick" in line
    assert "COMPLETED" in line
    rows = json.loads(_ok(cli(config, "list", "--json")))
    assert wid in [r["workflow_id"] for r in rows]

    shown = _ok(cli(config, "show", wid))
    assert f"Workflow {wid}  (ServiceQuick)" in shown
    assert "status      COMPLETED" in shown
    timeline = shown.split("timeline", 1)[1].split("  state", 1)[0]
    steps = [line.split() for line in timeline.strip().splitlines()]
    assert [(s[1], s[2], s[4], s[5]) for s in steps] == [
        ("step", "Step_One", "1", "completed"),
        ("step", "Step_Two", "1", "completed"),
    ], timeline


def test_retry_a_failed_workflow_through_the_agent(
    running: tuple[Path, AgentProcess], tmp_path: Path
) -> None:
    config, agent = running
    flag = tmp_path / "flag"
    reply = json.loads(
        _ok(cli(config, "start", "ServiceFlaky", "--data", json.dumps({"flag": str(flag)})))
    )
    wid = reply["workflow_id"]
    failed = _wait_status(config, wid, "FAILED", "COMPLETED")
    assert failed["status"] == "FAILED"
    assert "does not exist yet" in failed["error"]

    flag.touch()
    _ok(cli(config, "retry", wid))
    done = _wait_status(config, wid, "COMPLETED", "FAILED")
    assert done["status"] == "COMPLETED", done
    assert journal(agent.database, wid) == [
        ("Prepare", "forward", 1, "completed"),
        ("Needs_Flag", "forward", 1, "failed"),
        ("Needs_Flag", "forward", 2, "completed"),
    ]
    # Retrying a COMPLETED workflow is refused with a sentence, exit code 2.
    again = cli(config, "retry", wid)
    assert again.returncode == 2
    assert "only FAILED and COMPENSATION_FAILED" in again.stderr


def test_cancel_a_running_saga_through_the_agent(running: tuple[Path, AgentProcess]) -> None:
    config, _ = running
    wid = json.loads(_ok(cli(config, "start", "ServiceCancelSaga", "--data", '{"seconds": 60}')))[
        "workflow_id"
    ]
    poll(
        lambda: _show(config, wid),
        lambda info: (
            info["current_step"] == "Wait_Long" and info["journal"][-1]["outcome"] == "started"
        ),
        what="the saga to block in Wait_Long",
    )
    _ok(cli(config, "cancel", wid, "--reason", "operator said so"))
    info = _wait_status(
        config, wid, "CANCELLED", "COMPENSATION_FAILED", "FAILED_ROLLED_BACK", within=5
    )
    assert info["status"] == "CANCELLED"
    assert info["state"]["compensations"] == ["Reserve"]
    assert [(j["step"], j["phase"], j["outcome"]) for j in info["journal"]] == [
        ("Reserve", "forward", "completed"),
        ("Wait_Long", "forward", "cancelled"),
        ("Reserve", "compensate", "completed"),
    ]


def test_pins_and_a_refused_test_hook(running: tuple[Path, AgentProcess]) -> None:
    config, agent = running
    assert _ok(cli(config, "pins")).split() == ["lamp", "False", "door", "False"]
    assert "door             True" in _ok(cli(config, "pins", "--set", "door=1"))
    _ok(cli(config, "pins", "--set", "door=0"))
    # Without EDGESAGA_TEST_HOOKS=1 the agent refuses to block its own loop.
    reply = agent.request("_block_loop", seconds=5)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "unknown_command"


@pytest.mark.parametrize("setting", ["door=yes", "door=2", "door=maybe", "door=", "door"])
def test_pins_set_refuses_a_value_that_is_not_a_boolean(
    running: tuple[Path, AgentProcess], setting: str
) -> None:
    config, agent = running
    _ok(cli(config, "pins", "--set", "door=1"))
    refused = cli(config, "pins", "--set", setting)
    assert refused.returncode == 2, refused
    assert refused.stdout == ""
    assert refused.stderr.startswith("edgesaga: error: ")
    assert "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "0, 1, true, false, on or off" in refused.stderr
    # The input kept its value: a refused value does not drive it anywhere.
    assert agent.request("pins")["pins"]["door"] is True


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("door=ON", True), ("door=Off", False), ("door=TRUE", True), ("door=false", False)],
)
def test_pins_set_accepts_the_boolean_words_in_any_case(
    running: tuple[Path, AgentProcess], setting: str, expected: bool
) -> None:
    config, agent = running
    _ok(cli(config, "pins", "--set", "door=" + ("0" if expected else "1")))
    _ok(cli(config, "pins", "--set", setting))
    assert agent.request("pins")["pins"]["door"] is expected


def test_set_input_over_the_socket_parses_strictly(running: tuple[Path, AgentProcess]) -> None:
    _, agent = running
    assert agent.request("set_input", device="door", value=True)["pins"]["door"] is True
    # The string "false" means false (it used to drive the input true: any non-empty string did).
    assert agent.request("set_input", device="door", value="false")["pins"]["door"] is False
    assert agent.request("set_input", device="door", value="On")["pins"]["door"] is True
    for bad in ("maybe", "yes", 2, 0.5, None, [], ""):
        reply = agent.request("set_input", device="door", value=bad)
        assert reply["ok"] is False, (bad, reply)
        assert reply["error"]["message"] == (
            f"Device 'door' is an input device; its value must be true or false, not {bad!r}."
        )
        assert agent.request("pins")["pins"]["door"] is True
    reply = agent.request("set_input", device="door")  # no value at all
    assert reply["ok"] is False
    assert agent.request("pins")["pins"]["door"] is True


def test_get_prints_the_workflow_as_json_through_the_agent(
    running: tuple[Path, AgentProcess],
) -> None:
    config, agent = running
    wid = agent.start("ServiceQuick", {"seconds": 1})
    agent.wait_status(wid, "COMPLETED")
    info = json.loads(_ok(cli(config, "get", wid)))
    assert (info["workflow_id"], info["status"]) == (wid, "COMPLETED")
    assert [j["step"] for j in info["journal"]] == ["Step_One", "Step_Two"]
    assert info["state"]["done"] == ["Step_One", "Step_Two"]
    missing = cli(config, "get", "no-such-id")
    assert missing.returncode == 2
    assert "no-such-id" in missing.stderr


def test_agent_logs_the_outputs_it_set_safe_not_the_inputs(
    running: tuple[Path, AgentProcess],
) -> None:
    _, agent = running
    line = next(
        row for row in agent.log_text().splitlines() if "outputs set to their safe values" in row
    )
    assert line.endswith("outputs set to their safe values: lamp=False"), line


def test_start_help_says_what_happens_with_and_without_an_agent(tmp_path: Path) -> None:
    text = _ok(cli(write_config(tmp_path), "start", "--help"))
    assert "run it in this process" not in text
    assert "With a running agent" in text
    assert "status ACTIVE" in text
    assert "exit code 3" in text


def test_second_agent_on_the_same_database_refuses_to_start(
    running: tuple[Path, AgentProcess],
) -> None:
    config, agent = running
    second = cli(config, "run", timeout=15)
    assert second.returncode != 0
    assert "already drives" in second.stderr, second.stderr
    assert str(agent.database) in second.stderr
    # ... and the first agent is untouched: its socket still answers.
    assert agent.request("status")["ok"] is True
    assert agent.proc.poll() is None


# ------------------------------------------------------------------------------------------------
# Without an agent


def test_without_an_agent_start_runs_in_process_and_list_reads_the_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    started = cli(config, "start", "ServiceQuick", "--definitions", str(SERVICE_DEFS))
    snapshot = json.loads(_ok(started))
    wid = snapshot["workflow_id"]
    assert snapshot["status"] == "COMPLETED"
    assert snapshot["state"]["done"] == ["Step_One", "Step_Two"]
    assert f"started ServiceQuick {wid}" in started.stderr
    assert not (tmp_path / "control.sock").exists()

    rows = json.loads(_ok(cli(config, "list", "--json")))
    assert [(r["workflow_id"], r["status"]) for r in rows] == [(wid, "COMPLETED")]
    assert "timeline" in _ok(cli(config, "show", wid))


def test_without_an_agent_get_reads_the_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    wid = json.loads(_ok(cli(config, "start", "ServiceQuick", "--definitions", str(SERVICE_DEFS))))[
        "workflow_id"
    ]
    info = json.loads(_ok(cli(config, "get", wid)))
    assert (info["workflow_id"], info["status"]) == (wid, "COMPLETED")
    assert json.loads(_ok(cli(config, "show", wid, "--json"))) == info


def test_the_readme_desktop_config_runs_on_mock_pins(tmp_path: Path) -> None:
    from agent._config import load_config

    readme = (ROOT / "README.md").read_text()
    block = readme.split("save this as `agent.yaml`", 1)[1].split("```yaml\n", 1)[1]
    path = tmp_path / "agent.yaml"
    path.write_text(block.split("```", 1)[0])
    cfg = load_config(path, environ={})
    assert cfg.mqtt.enabled is False
    assert cfg.hardware is not None
    assert cfg.hardware.pin_factory == "mock"
    assert sorted(cfg.hardware.devices) == ["level", "pump", "valve"]
    assert cfg.database == tmp_path / ".edgesaga" / "edgesaga.db"  # beside it, not in /var/lib


def test_run_with_pins_it_cannot_open_creates_no_database(tmp_path: Path) -> None:
    """A desktop with the Pi's config: the pin factory fails first, before anything is created."""
    config = write_config(
        tmp_path,
        hardware={"pin_factory": "lgpio", "devices": {"lamp": {"kind": "output", "pin": 17}}},
        logging={"level": "WARNING", "format": "text"},
    )
    result = cli(config, "run")
    assert result.returncode == 2, result
    assert "pin_factory: mock" in result.stderr
    assert not (tmp_path / "state").exists()  # the database's directory, and so the database


def test_without_an_agent_retry_runs_in_process(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    flag = tmp_path / "flag"
    failed = cli(
        config,
        "start",
        "ServiceFlaky",
        "--data",
        json.dumps({"flag": str(flag)}),
        "--definitions",
        str(SERVICE_DEFS),
    )
    assert failed.returncode == 3, failed.stderr  # not COMPLETED
    wid = json.loads(failed.stdout)["workflow_id"]
    flag.touch()
    retried = json.loads(_ok(cli(config, "retry", wid)))
    assert retried["status"] == "COMPLETED"


def test_write_command_while_another_process_holds_the_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    marker = tmp_path / "started"
    data = json.dumps({"seconds": 30, "marker": str(marker)})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent._cli",
            "start",
            "ServiceLong",
            "--id",
            "held-1",
            "--data",
            data,
            "--definitions",
            str(SERVICE_DEFS),
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        poll(
            lambda: marker.exists() or holder.poll() is not None,
            bool,
            what="the holder to start its step",
        )
        assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""

        for args in (
            ("cancel", "held-1"),
            ("start", "ServiceQuick", "--definitions", str(SERVICE_DEFS)),
        ):
            refused = cli(config, *args)
            assert refused.returncode == 2, refused
            assert refused.stderr.startswith(
                "edgesaga: error: Another edgesaga process already drives"
            )
            assert "Traceback" not in refused.stderr
        # Reading needs no lock.
        rows = json.loads(_ok(cli(config, "list", "--json")))
        assert [(r["workflow_id"], r["status"]) for r in rows] == [("held-1", "ACTIVE")]
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stderr:
            holder.stderr.close()
