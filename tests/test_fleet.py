"""``edgesaga fleet``: three real ``edgesaga run`` agents on one real Mosquitto, one of them killed
with SIGKILL (its last will says ``offline``), read back from the retained topics alone.

Each agent has its own device id, database and control socket, and the same topic prefix. The
expected counts come from the workflows the test drove to their statuses; the expected last event
time of each device is read from the broker's own retained snapshots.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import publish

from agent import _fleet as fleet_module
from agent._fleet import Fleet, FleetError, _Inbox, _take, parse_broker, render
from tests._broker import Broker, unique_prefix
from tests.flows.service.harness import (
    ROOT,
    SERVICE_DEFS,
    AgentProcess,
    base_env,
    poll,
    retained,
    write_config,
)

pytestmark = pytest.mark.timeout(120)

PAUSE_DEF = ROOT / "tests" / "flows" / "crashflow" / "pause.yaml"
HEADER = "DEVICE  STATE    ACTIVE  PAUSED  FAILED  LAST EVENT"


def fleet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", "fleet", *args]


def run_fleet(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleet_cmd(*args),
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    yield made
    for agent in made:
        agent.kill()


def start_agent(
    tmp_path: Path, broker: Broker, prefix: str, device: str, made: list[AgentProcess]
) -> AgentProcess:
    config = write_config(
        tmp_path / device,
        device_id=device,
        definitions=[str(SERVICE_DEFS), str(PAUSE_DEF)],
        mqtt={"port": broker.port, "topic_prefix": prefix, "reconnect_max": 1.0},
    )
    agent = AgentProcess(config)
    made.append(agent)
    agent.wait_ready()
    poll(
        lambda: agent.request("status"),
        lambda s: s["mqtt_connected"] is True,
        what=f"{device} to connect to the broker",
    )
    return agent


def drive(
    agent: AgentProcess, tmp_path: Path, *, completed: int, paused: int, failed: int, active: int
) -> None:
    """Leave the agent with this many workflows in each status."""
    for _ in range(completed):
        agent.wait_status(agent.start("ServiceQuick"), "COMPLETED")
    for i in range(paused):
        ledger = tmp_path / f"ledger-{agent.pid}-{i}"
        agent.wait_status(agent.start("FlowPause", {"ledger": str(ledger)}), "PAUSED")
    for _ in range(failed):
        missing = tmp_path / "never-created-flag"
        agent.wait_status(agent.start("ServiceFlaky", {"flag": str(missing)}), "FAILED")
    for _ in range(active):
        wid = agent.start("ServiceLong", {"seconds": 600})
        poll(
            lambda wid=wid: agent.get(wid),
            lambda info: info["journal"] and info["journal"][-1]["outcome"] == "started",
            what="the long step to start",
        )


def snapshots(port: int, prefix: str, expected: int) -> dict[str, dict[str, Any]]:
    """The retained state snapshots under ``prefix``, once there are ``expected`` of them and none
    still shows a status the test did not leave it in."""
    settled = {"COMPLETED", "PAUSED", "FAILED", "ACTIVE"}

    def read() -> dict[str, dict[str, Any]]:
        got = retained(port, f"{prefix}/+/workflows/+/state", settle=0.3)
        return {t: json.loads(p) for t, p in got.items()}

    def ready(got: dict[str, dict[str, Any]]) -> bool:
        if len(got) != expected or any(s["status"] not in settled for s in got.values()):
            return False
        # a ServiceLong's snapshot after its step_started: current_step is its one step
        return all(
            s["status"] != "ACTIVE" or s["current_step"] == "Long_Sleep" for s in got.values()
        )

    return poll(read, ready, within=20, what=f"{expected} settled retained snapshots")


def last_event(snaps: dict[str, dict[str, Any]], prefix: str, device: str) -> str:
    return max(s["updated_at"] for t, s in snaps.items() if t.startswith(f"{prefix}/{device}/"))


def line(device: str, state: str, active: int, paused: int, failed: int, at: str) -> str:
    return f"{device:<6}  {state:<7}  {active:>6}  {paused:>6}  {failed:>6}  {at}"


def test_fleet_shows_two_online_and_the_killed_agent_offline_with_their_counts(
    tmp_path: Path, broker: Broker, agents: list[AgentProcess]
) -> None:
    prefix = unique_prefix()
    alpha = start_agent(tmp_path, broker, prefix, "alpha", agents)
    bravo = start_agent(tmp_path, broker, prefix, "bravo", agents)
    charl = start_agent(tmp_path, broker, prefix, "charl", agents)
    drive(alpha, tmp_path, completed=1, paused=1, failed=1, active=1)
    drive(bravo, tmp_path, completed=2, paused=0, failed=0, active=2)
    drive(charl, tmp_path, completed=1, paused=2, failed=1, active=0)
    snaps = snapshots(broker.port, prefix, expected=4 + 4 + 4)

    charl.kill()  # SIGKILL: no goodbye; the broker publishes its last will
    poll(
        lambda: retained(broker.port, f"{prefix}/charl/availability", settle=0.2),
        lambda got: got == {f"{prefix}/charl/availability": b"offline"},
        what="charl's last will",
    )

    done = run_fleet("--broker", f"127.0.0.1:{broker.port}", "--prefix", prefix)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        HEADER,
        line("alpha", "online", 1, 1, 1, last_event(snaps, prefix, "alpha")),
        line("bravo", "online", 2, 0, 0, last_event(snaps, prefix, "bravo")),
        line("charl", "offline", 0, 2, 1, last_event(snaps, prefix, "charl")),
    ]

    done = run_fleet("--broker", f"127.0.0.1:{broker.port}", "--prefix", prefix, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "prefix": prefix,
        "malformed_ignored": 0,
        "untracked": 0,
        "complete": True,
        "devices": [
            {
                "device_id": device,
                "availability": state,
                "active": active,
                "paused": paused,
                "failed": failed,
                "workflows": total,
                "last_event": last_event(snaps, prefix, device),
            }
            for device, state, active, paused, failed, total in [
                ("alpha", "online", 1, 1, 1, 4),
                ("bravo", "online", 2, 0, 0, 4),
                ("charl", "offline", 0, 2, 1, 4),
            ]
        ],
    }


def read_frame(proc: subprocess.Popen[str], deadline: float) -> list[str]:
    """The next frame of ``--watch`` output (lines up to the empty line that ends it)."""
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        text = proc.stdout.readline()
        if text == "":
            raise AssertionError(
                f"fleet --watch ended early: {proc.stderr.read() if proc.stderr else ''}"
            )
        if text == "\n" and lines:
            return lines
        if text != "\n":
            lines.append(text.rstrip("\n"))
    raise AssertionError(f"no whole frame in time; got {lines}")


def test_watch_redraws_when_an_agent_dies_between_two_frames(
    tmp_path: Path, broker: Broker, agents: list[AgentProcess]
) -> None:
    prefix = unique_prefix()
    alpha = start_agent(tmp_path, broker, prefix, "alpha", agents)
    bravo = start_agent(tmp_path, broker, prefix, "bravo", agents)
    drive(alpha, tmp_path, completed=1, paused=0, failed=1, active=0)
    drive(bravo, tmp_path, completed=0, paused=1, failed=0, active=1)
    snaps = snapshots(broker.port, prefix, expected=4)

    command = fleet_cmd("--broker", f"127.0.0.1:{broker.port}", "--prefix", prefix, "--watch")
    with subprocess.Popen(
        command, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            deadline = time.monotonic() + 30
            assert read_frame(proc, deadline) == [
                HEADER,
                line("alpha", "online", 0, 0, 1, last_event(snaps, prefix, "alpha")),
                line("bravo", "online", 1, 1, 0, last_event(snaps, prefix, "bravo")),
            ]
            bravo.kill()
            assert read_frame(proc, deadline) == [
                HEADER,
                line("alpha", "online", 0, 0, 1, last_event(snaps, prefix, "alpha")),
                line("bravo", "offline", 1, 1, 0, last_event(snaps, prefix, "bravo")),
            ]
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(timeout=10) == 0
            assert proc.stderr is not None
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_malformed_and_foreign_payloads_are_ignored_and_counted(broker: Broker) -> None:
    prefix = unique_prefix()
    good = {
        "workflow_id": "w1",
        "workflow_type": "T",
        "status": "PAUSED",
        "current_step": "A",
        "error": None,
        "updated_at": "2026-12-01T10:00:00.000Z",
        "seq": 3,
    }
    publish.multiple(
        [
            {"topic": f"{prefix}/dev1/availability", "payload": b"online", "retain": True},
            {
                "topic": f"{prefix}/dev1/workflows/w1/state",
                "payload": json.dumps(good),
                "retain": True,
            },
            # not what an agent publishes: each is counted once and changes nothing
            {"topic": f"{prefix}/dev1/workflows/w2/state", "payload": b"{not json", "retain": True},
            {
                "topic": f"{prefix}/dev1/workflows/w3/state",
                "payload": json.dumps([1, 2]),
                "retain": True,
            },
            {
                "topic": f"{prefix}/dev1/workflows/w4/state",
                "payload": json.dumps({**good, "status": "SLEEPING"}),
                "retain": True,
            },
            {
                "topic": f"{prefix}/dev1/workflows/w5/state",
                "payload": json.dumps({**good, "pad": "x" * 10_000}),
                "retain": True,
            },
            {"topic": f"{prefix}/dev2/availability", "payload": b"maybe", "retain": True},
        ],
        hostname="127.0.0.1",
        port=broker.port,
    )
    done = run_fleet("--broker", f"127.0.0.1:{broker.port}", "--prefix", prefix)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "DEVICE  STATE    ACTIVE  PAUSED  FAILED  LAST EVENT",
        "dev1    online        0       1       0  2026-12-01T10:00:00.000Z",
        "(5 malformed messages ignored)",
    ]


def test_an_unreachable_broker_is_one_sentence_and_a_non_zero_exit() -> None:
    from tests._broker import free_port

    done = run_fleet("--broker", f"127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("edgesaga: error: cannot reach the MQTT broker 127.0.0.1:")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("broker.lan", ("broker.lan", None)),
        ("10.0.0.2:8883", ("10.0.0.2", 8883)),
        ("[::1]:1884", ("::1", 1884)),
        ("[fe80::1]", ("fe80::1", None)),
    ],
)
def test_broker_addresses(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_broker(text) == expected


@pytest.mark.parametrize("text", ["", "host:0", "host:70000", "host:x", ":1883", "a b", "[::1"])
def test_bad_broker_addresses_are_refused_in_one_sentence(text: str) -> None:
    with pytest.raises(FleetError, match=r"^--broker .*\.$"):
        parse_broker(text)


def test_the_bounds_keep_devices_and_workflows_from_growing_without_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet_module, "MAX_DEVICES", 2)
    monkeypatch.setattr(fleet_module, "MAX_WORKFLOWS", 3)
    fleet = Fleet("p")
    snap = json.dumps({"status": "ACTIVE", "updated_at": "2026-12-01T10:00:00Z"}).encode()
    for device in ("a", "b", "c"):
        fleet.feed(f"p/{device}/availability", b"online")
    assert sorted(fleet.devices) == ["a", "b"]
    for n in range(5):
        fleet.feed(f"p/a/workflows/w{n}/state", snap)
    assert fleet.workflows == 3
    assert fleet.untracked == 1 + 2
    # a cleared snapshot frees its place
    assert fleet.feed("p/a/workflows/w0/state", b"") is True
    assert fleet.feed("p/b/workflows/x/state", snap) is True
    assert [(r["device_id"], r["active"]) for r in fleet.rows()] == [("a", 2), ("b", 1)]
    assert render(fleet).splitlines()[-1] == (
        "(3 messages beyond 2 devices or 3 workflows not counted)"
    )


def test_topics_outside_the_layout_are_counted_as_malformed() -> None:
    fleet = Fleet("p")
    assert fleet.feed("p/a/workflows/w/state/extra", b"{}") is False
    assert fleet.feed("q/a/availability", b"online") is False
    assert fleet.feed("", b"online") is False
    assert fleet.malformed == 3
    assert fleet.devices == {}
    assert fleet.feed("p/a/availability", b"offline") is True
    assert fleet.feed("p/a/availability", b"offline") is False  # no change, no redraw
    assert fleet.feed("p/a/availability", b"") is True  # cleared: state unknown
    assert fleet.rows()[0]["availability"] == "unknown"


async def test_a_burst_still_arriving_at_the_timeout_is_marked_incomplete() -> None:
    inbox = _Inbox()
    fleet = Fleet("p")

    async def chatter() -> None:
        for n in range(10_000):  # one new workflow every 50 ms: never quiet for 0.3 s
            inbox.queue.put_nowait((f"p/a/workflows/w{n}/state", b'{"status": "ACTIVE"}'))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(chatter())
    try:
        await _take(inbox, fleet, 1.0)
    finally:
        task.cancel()
    assert fleet.complete is False
    assert fleet.workflows > 0
    assert render(fleet).splitlines()[-1] == (
        "(still receiving when the time was up: give a longer --timeout)"
    )

    quiet = Fleet("p")
    await _take(_Inbox(), quiet, 1.0)  # nothing comes: quiet after 0.3 s
    assert quiet.complete is True
    assert render(quiet).splitlines()[-1] == "(no device has published under p/)"


def test_a_timeout_out_of_range_is_refused_in_one_sentence() -> None:
    done = run_fleet("--broker", "127.0.0.1:1", "--timeout", "0.1")
    assert done.returncode == 2
    assert done.stderr == "edgesaga: error: --timeout must be from 1.0 to 60 seconds.\n"


def test_watch_ends_with_one_sentence_when_the_broker_goes_away(broker: Broker) -> None:
    prefix = unique_prefix()
    publish.single(
        f"{prefix}/dev1/availability",
        b"online",
        retain=True,
        hostname="127.0.0.1",
        port=broker.port,
    )
    command = fleet_cmd("--broker", f"127.0.0.1:{broker.port}", "--prefix", prefix, "--watch")
    with subprocess.Popen(
        command, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert read_frame(proc, time.monotonic() + 30)[1:] == [
                "dev1    online        0       0       0  -"
            ]
            broker.kill()
            assert proc.wait(timeout=20) == 2
            assert proc.stderr is not None
            err = proc.stderr.read()
            assert err.startswith(
                f"edgesaga: error: lost the connection to the MQTT broker 127.0.0.1:{broker.port} ("
            ), err
            assert err.endswith("); run edgesaga fleet again once it is back.\n"), err
            assert err.count("\n") == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_the_port_and_version_come_from_an_agent_config(tmp_path: Path, broker: Broker) -> None:
    prefix = unique_prefix()
    publish.single(
        f"{prefix}/dev9/availability",
        b"offline",
        retain=True,
        hostname="127.0.0.1",
        port=broker.port,
    )
    config = write_config(
        tmp_path, mqtt={"port": broker.port, "topic_prefix": prefix, "version": "3.1.1"}
    )
    done = run_fleet("--broker", "127.0.0.1", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["prefix"] == prefix
    assert [(d["device_id"], d["availability"]) for d in got["devices"]] == [("dev9", "offline")]
    # the command line wins over the config: another prefix, nothing under it
    done = run_fleet("--broker", "127.0.0.1", "--config", str(config), "--prefix", prefix + "-x")
    assert done.stdout.splitlines()[1] == f"(no device has published under {prefix}-x/)"


def test_tls_and_a_password_reach_a_locked_down_broker(
    tmp_path: Path, broker_factory: Callable[..., Broker]
) -> None:
    locked = broker_factory(tls=True, users={"fleet": "s3cret"})
    assert locked.ca_file is not None
    prefix = unique_prefix()
    publish.single(
        f"{prefix}/dev1/availability",
        b"online",
        retain=True,
        hostname="127.0.0.1",
        port=locked.port,
        auth={"username": "fleet", "password": "s3cret"},
        tls={"ca_certs": str(locked.ca_file)},
    )
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")
    bad.write_text("wrong\n")
    where = ["--broker", f"127.0.0.1:{locked.port}", "--prefix", prefix, "--ca-file"]
    where += [str(locked.ca_file), "--username", "fleet"]
    done = run_fleet(*where, "--password-file", str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "dev1    online        0       0       0  -"

    done = run_fleet(*where, "--password-file", str(bad))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(
        f"edgesaga: error: MQTT broker 127.0.0.1:{locked.port} refused the connection: not "
        "authorized"
    ), done.stderr
    assert done.stderr.count("\n") == 1
