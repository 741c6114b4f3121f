"""The fail-safe harness: ``edgesaga run --config`` on mock valve/pump/level pins, a full disk,
and an MQTT listener. Builds on tests/flows/service/harness.py (config, polling, the agent
process and its control socket); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.failsafe.steps import PIN_LOG_ENV
from tests.flows.service.harness import (
    HOST,
    ROOT,
    AgentProcess,
    NotifyListener,
    base_env,
    poll,
)

DEFS = ROOT / "tests" / "failsafe" / "defs"
#: The console script of the venv the tests run in: the command a user runs.
EDGESAGA = Path(sys.executable).with_name("edgesaga")
DEVICE_ID = "fs-test"
#: The irrigation wiring (workflows/irrigation/devices.yaml) without its simulation.
DEVICES: dict[str, dict[str, Any]] = {
    "valve": {"kind": "output", "pin": 17, "safe": False},
    "pump": {"kind": "output", "pin": 27, "safe": False},
    "level": {"kind": "input", "pin": 22, "pull_up": True},
}
IRRIGATION_STEPS = ["Open_Valve", "Start_Pump", "Wait_For_Level", "Stop_Pump", "Close_Valve"]


def write_config(
    directory: Path, *, broker_port: int | None = None, prefix: str = "fs", **overrides: Any
) -> Path:
    """``agent.yaml`` in ``directory``: database and control socket beside it, the mock
    irrigation devices, the fail-safe workflows, ``grace_period: 1``, MQTT on ``broker_port``."""
    data: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "database": str(directory / "state" / "edgesaga.db"),
        "control_socket": str(directory / "control.sock"),
        "definitions": [str(DEFS)],
        "include_bundled": False,
        "grace_period": 1,
        "logging": {"level": "INFO", "format": "text"},
        "hardware": {"pin_factory": "mock", "devices": DEVICES},
        "mqtt": {"enabled": False}
        if broker_port is None
        else {"enabled": True, "host": HOST, "port": broker_port, "topic_prefix": prefix},
    }
    data.update(overrides)
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class FailSafeAgent(AgentProcess):
    """``edgesaga run --config CONFIG`` (the venv's console script); with ``pin_log`` the process
    writes its mock pins' histories there as it exits (see tests/failsafe/steps.py)."""

    def __init__(self, config: Path, *, log_name: str, pin_log: Path | None = None) -> None:
        self.config = config
        cfg = yaml.safe_load(config.read_text())
        self.socket_path = Path(cfg["control_socket"])
        self.database = Path(cfg["database"])
        self.notify = NotifyListener()
        extra = {"NOTIFY_SOCKET": self.notify.address}
        if pin_log is not None:
            extra[PIN_LOG_ENV] = str(pin_log)
        self.log_path = config.parent / log_name
        self._log = self.log_path.open("wb")
        self.started_at = time.monotonic()
        assert EDGESAGA.exists(), f"no edgesaga command beside {sys.executable}"
        self.proc = subprocess.Popen(
            [str(EDGESAGA), "run", "--config", str(config)],
            cwd=ROOT,
            env=base_env(**extra),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def pins(self) -> dict[str, Any]:
        """The agent's own ``pins`` command, with the mock pins' histories."""
        reply = self.request("pins", history=True)
        assert reply["ok"], reply
        return reply

    def history(self) -> dict[str, list[Any]]:
        return dict(self.pins()["history"])

    def set_input(self, device: str, value: bool) -> None:
        reply = self.request("set_input", device=device, value=value)
        assert reply["ok"], reply

    def steps(self, workflow_id: str) -> list[tuple[str, str, str]]:
        """``(step, phase, outcome)`` of the workflow's journal, from ``get``."""
        return [(j["step"], j["phase"], j["outcome"]) for j in self.get(workflow_id)["journal"]]

    def wait_started(self, workflow_id: str, step: str, within: float = 15.0) -> None:
        """Wait until ``step`` of the workflow has begun (its "started" record committed)."""
        poll(
            lambda: self.steps(workflow_id),
            lambda rows: (step, "forward", "started") in rows,
            within=within,
            what=f"{workflow_id} to start {step}",
        )

    def wait_log(self, text: str, within: float = 15.0) -> str:
        return str(
            poll(self.log_text, lambda log: text in log, within=within, what=f"{text!r} in the log")
        )


@contextlib.contextmanager
def failsafe_agent(
    config: Path, *, log_name: str = "agent.log", pin_log: Path | None = None
) -> Iterator[FailSafeAgent]:
    """A started and READY :class:`FailSafeAgent`, always killed at the end."""
    agent = FailSafeAgent(config, log_name=log_name, pin_log=pin_log)
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.kill()


def statuses(database: Path) -> dict[str, str]:
    """Every workflow's status in the database, read-only (for an agent that has stopped)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT id, status FROM instances").fetchall())
    finally:
        conn.close()


def outputs(history: dict[str, list[Any]]) -> dict[str, list[bool]]:
    """The outputs' pin histories (the input ``level`` left out), as booleans."""
    return {name: [bool(v) for v in history[name]] for name in ("valve", "pump")}


# ------------------------------------------------------------------------------------------------
# A disk that fills up


class SmallDisk:
    """A 4 MiB tmpfs mounted at ``path``: a real file system that runs out of space (ENOSPC).

    :meth:`fill` takes every free block with one file, :meth:`free` deletes it. Mounting needs root
    (CAP_SYS_ADMIN), which the test machine and the Pi's image builder have."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert done.returncode == 0, (
            f"could not mount a tmpfs at {path} (this test needs root): {done.stderr.strip()}"
        )

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                chunk = b"\0" * size
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        assert self.free_bytes() == 0

    def free(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=10)


# ------------------------------------------------------------------------------------------------
# MQTT


class MqttLog:
    """A paho client on its own thread that keeps every message under ``<prefix>/<device>/``."""

    def __init__(self, port: int, prefix: str) -> None:
        self.base = f"{prefix}/{DEVICE_ID}"
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fs-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        #: Outside the agent's prefix, where the agent may send replies (``reply_to``).
        self.replies = f"{prefix}-replies/{DEVICE_ID}"
        self.client.connect(HOST, port, 30)
        self.client.loop_start()
        self.client.subscribe([(f"{self.base}/#", 1), (self.replies, 1)])
        assert subscribed.wait(10), "no SUBACK from the broker"

    def _message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))

    def on(self, leaf: str) -> list[bytes]:
        """Payloads received on ``<base>/<leaf>``, oldest first."""
        return self.on_topic(f"{self.base}/{leaf}")

    def on_topic(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def command(self, name: str, **fields: Any) -> dict[str, Any]:
        """Publish ``cmd/<name>`` with ``reply_to`` set and return the agent's reply."""
        request_id = f"mqtt-{uuid.uuid4()}"
        body = {"request_id": request_id, "reply_to": self.replies, **fields}
        self.client.publish(f"{self.base}/cmd/{name}", json.dumps(body), qos=1)
        replies = self.wait_for(
            lambda: [json.loads(p) for p in self.on_topic(self.replies)],
            lambda got: any(r.get("request_id") == request_id for r in got),
            f"the reply to {request_id}",
        )
        return dict(next(r for r in replies if r.get("request_id") == request_id))

    def alerts(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on("alerts")]

    def wait_for(self, get: Callable[[], Any], ok: Callable[[Any], bool], what: str) -> Any:
        return poll(get, ok, within=15, what=what)

    def wait_availability(self, value: bytes) -> None:
        """Wait until the last ``availability`` message is ``value``."""
        self.wait_for(
            lambda: self.on("availability"), lambda got: got[-1:] == [value], value.decode()
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # close now, not at garbage collection (ResourceWarning)


@contextlib.contextmanager
def mqtt_log(port: int, prefix: str) -> Iterator[MqttLog]:
    log = MqttLog(port, prefix)
    try:
        yield log
    finally:
        log.close()
