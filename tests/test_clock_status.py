"""The agent's status says whether its clock is synchronized and how many timers wait for it,
on every path (the control socket, MQTT ``cmd/status``, ``edgesaga status``, systemd's STATUS=),
and ``edgesaga schedules`` / ``cmd/schedules`` list each schedule's next fire and last run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests._broker import Broker, unique_prefix
from tests.flows.service.harness import agent_process, cli, poll, write_config
from tests.test_operator_paths import DEVICE, Mqtt

SCHEDULE = {
    "name": "morning",
    "workflow_type": "ServiceQuick",
    "cron": "0 6 * * *",
    "timezone": "Europe/Berlin",
    "missed": "run_once",
}


def _config(directory: Path, **overrides: Any) -> tuple[Path, Path]:
    synced = directory / "synchronized"
    config = write_config(
        directory,
        device_id=DEVICE,
        clock={"sync_file": str(synced)},
        schedules=[SCHEDULE],
        **overrides,
    )
    return config, synced


def test_status_on_the_socket_the_cli_and_systemd_says_whether_the_clock_is_synced(
    tmp_path: Path,
) -> None:
    config, synced = _config(tmp_path)
    with agent_process(config) as agent:
        ready = agent.wait_ready()
        assert ready["STATUS"].endswith(", clock not synced (0 timer(s) wait for it)"), ready
        status = agent.request("status")
        assert status["clock_synchronized"] is False
        assert status["timers_waiting_on_sync"] == 0
        out = cli(config, "status")
        assert out.returncode == 0, out.stderr
        assert "clock     not synchronized; 0 timer(s) wait for it" in out.stdout.splitlines()
        assert f"agent     {DEVICE} running (pid {agent.pid})" in out.stdout.splitlines()
        synced.touch()
        assert agent.request("status")["clock_synchronized"] is True
        out = cli(config, "status")
        assert "clock     synchronized" in out.stdout.splitlines()
        # systemd's status line follows within its 2 s refresh.
        agent.notify.wait_for("STATUS", "running 0, queued 0, paused 0, clock synced", within=10)


def test_schedules_and_status_without_an_agent_read_the_config_and_the_database(
    tmp_path: Path,
) -> None:
    config, synced = _config(tmp_path)
    with agent_process(config) as agent:  # makes the database
        agent.wait_ready()
        agent.terminate()
        assert agent.wait_exit() == 0
    out = cli(config, "schedules")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "morning: ServiceQuick at '0 6 * * *' in Europe/Berlin (missed: run_once, overlap: skip)",
        "  next  waits for clock sync",
        "  last  never fired",
    ]
    synced.touch()
    rows = json.loads(cli(config, "schedules", "--json").stdout)
    (row,) = rows
    assert row["next_fire"].endswith(("T06:00:00+01:00", "T06:00:00+02:00"))  # Berlin's 06:00
    assert row["next_fire_utc"].endswith(("T05:00:00Z", "T04:00:00Z"))
    assert row["last_run"] is None
    assert row["waits_for_clock_sync"] is False
    out = cli(config, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "agent     not running (what follows is read from the database)"
    assert "clock     synchronized" in lines


def test_mqtt_status_and_schedules_carry_the_clock_and_the_listing(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        prefix = unique_prefix()
        config, synced = _config(
            tmp_path / "agent", mqtt={"port": broker.port, "topic_prefix": prefix}
        )
        with agent_process(config) as agent:
            agent.wait_ready()
            mqtt = Mqtt(broker.port, prefix)
            try:
                ping = b'{"request_id": "ping"}'
                status = poll(
                    lambda: mqtt.call("status", ping, within=0.5), bool, what="the MQTT link"
                )
                assert status["ok"] is True, status
                assert status["clock_synchronized"] is False
                assert status["timers_waiting_on_sync"] == 0
                assert status["mqtt_connected"] is True
                reply = mqtt.command("schedules", {})
                assert reply["ok"] is True, reply
                assert reply["clock_synchronized"] is False
                (row,) = reply["schedules"]
                assert row["name"] == "morning"
                assert row["waits_for_clock_sync"] is True
                assert row["next_fire"] is None
                synced.touch()
                (row,) = mqtt.command("schedules", {})["schedules"]
                assert row["next_fire_utc"] is not None
                assert row == agent.request("schedules")["schedules"][0] | {
                    "checked_at": row["checked_at"]
                }
            finally:
                mqtt.close()
    finally:
        broker.stop()
