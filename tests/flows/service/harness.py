"""Run ``edgesaga run`` as a real subprocess and watch it: config files, sd_notify, control socket.

Used by tests/test_agent_service.py, tests/test_agent_cli.py and tests/test_retention.py. Every
wait is bounded; :meth:`AgentProcess.kill` (called by the fixtures' teardown) never leaves a process
behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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

from agent._socket import request

ROOT = Path(__file__).resolve().parents[3]
SERVICE_DEFS = ROOT / "tests" / "flows" / "service"
HOST = "127.0.0.1"


def write_config(
    directory: Path,
    *,
    mqtt: dict[str, Any] | None = None,
    name: str = "agent.yaml",
    **overrides: Any,
) -> Path:
    """An agent config in ``directory``: database and control socket beside it, mock pins with one
    output ``lamp`` (safe: off) and one input ``door``, the service test workflows, MQTT off unless
    ``mqtt`` is given (a dict of mqtt keys, ``enabled: true`` implied)."""
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "device_id": "svc-test",
        "database": str(directory / "state" / "edgesaga.db"),
        "control_socket": str(directory / "control.sock"),
        "definitions": [str(SERVICE_DEFS)],
        "include_bundled": False,
        "grace_period": 2,
        "logging": {"level": "INFO", "format": "text"},
        "hardware": {
            "pin_factory": "mock",
            "devices": {
                "lamp": {"kind": "output", "pin": 17, "safe": False},
                "door": {"kind": "input", "pin": 22},
            },
        },
        "mqtt": {"enabled": False} if mqtt is None else {"enabled": True, "host": HOST, **mqtt},
    }
    data.update(overrides)
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: the repository importable, no stray EDGESAGA_/systemd
    variables from the outer environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGESAGA_", "NOTIFY_SOCKET", "WATCHDOG_", "GPIOZERO_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(
    config: Path, *args: str, timeout: float = 20.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``edgesaga <args> --config <config>`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "agent._cli", *args, "--config", str(config)],
        cwd=ROOT,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ------------------------------------------------------------------------------------------------
# sd_notify


class NotifyListener:
    """An abstract-namespace ``AF_UNIX``/``SOCK_DGRAM`` socket read by a thread; every datagram is
    kept as ``(time.monotonic(), {key: value})``."""

    def __init__(self) -> None:
        self.address = f"@edgesaga-test-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self._sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((now, fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def times(self, key: str, value: str = "1") -> list[float]:
        """Arrival times of every datagram carrying ``key=value``."""
        return [t for t, f in self.snapshot() if f.get(key) == value]

    def wait_for(
        self, key: str, value: str = "1", *, within: float = 15.0
    ) -> tuple[float, dict[str, str]]:
        """The first datagram with ``key=value``, waiting up to ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            for t, f in self.snapshot():
                if f.get(key) == value:
                    return t, f
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {key}={value} within {within} s; got {self.snapshot()}")
            time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# The agent process


class AgentProcess:
    """One ``edgesaga run --config <config>`` subprocess with its own notify socket."""

    def __init__(
        self,
        config: Path,
        *,
        watchdog_usec: int | None = None,
        test_hooks: bool = True,
        log_name: str = "agent.log",
    ) -> None:
        self.config = config
        cfg = yaml.safe_load(config.read_text())
        self.socket_path = Path(cfg["control_socket"])
        self.database = Path(cfg["database"])
        self.notify = NotifyListener()
        extra = {"NOTIFY_SOCKET": self.notify.address}
        if watchdog_usec is not None:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        if test_hooks:
            extra["EDGESAGA_TEST_HOOKS"] = "1"
        self.log_path = config.parent / log_name
        self._log = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            cwd=ROOT,
            env=base_env(**extra),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, within: float = 15.0) -> dict[str, str]:
        """Wait for READY=1 and return that datagram's fields."""
        try:
            _, fields = self.notify.wait_for("READY", within=within)
        except TimeoutError:
            raise AssertionError(
                f"the agent sent no READY=1 within {within} s (exit code {self.proc.poll()}); "
                f"log:\n{self.log_text()}"
            ) from None
        return fields

    def request(self, command: str, **fields: Any) -> dict[str, Any]:
        """One command over the control socket."""
        if command in ("start", "cancel", "retry", "resume", "get", "list"):
            fields.setdefault("request_id", f"test-{uuid.uuid4()}")
        return request(self.socket_path, command, timeout=10.0, **fields)

    def start(self, workflow_type: str, data: dict[str, Any] | None = None, **fields: Any) -> str:
        reply = self.request("start", workflow_type=workflow_type, data=data or {}, **fields)
        assert reply["ok"], reply
        return str(reply["workflow_id"])

    def get(self, workflow_id: str) -> dict[str, Any]:
        reply = self.request("get", workflow_id=workflow_id)
        assert reply["ok"], reply
        return reply

    def wait_status(self, workflow_id: str, *statuses: str, within: float = 10.0) -> dict[str, Any]:
        return poll(
            lambda: self.get(workflow_id),
            lambda info: info["status"] in statuses,
            within=within,
            what=f"workflow {workflow_id} to reach {statuses}",
        )

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, within: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the agent did not exit within {within} s; log:\n{self.log_text()}"
            ) from None

    def kill(self) -> None:
        """Teardown: SIGKILL if still running, then release everything."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.notify.close()
        self._log.close()


def poll(
    get: Callable[[], Any],
    ok: Callable[[Any], bool],
    *,
    within: float = 10.0,
    interval: float = 0.05,
    what: str = "a condition",
) -> Any:
    """Call ``get()`` until ``ok(value)`` holds; return that value (bounded by ``within``)."""
    deadline = time.monotonic() + within
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {within} s waiting for {what}; last value: {value!r}"
            )
        time.sleep(interval)


@contextlib.contextmanager
def agent_process(config: Path, **kwargs: Any) -> Iterator[AgentProcess]:
    """An :class:`AgentProcess` that is always killed at the end."""
    agent = AgentProcess(config, **kwargs)
    try:
        yield agent
    finally:
        agent.kill()


def journal(database: Path, workflow_id: str) -> list[tuple[str, str, int, str]]:
    """``(step, phase, attempt, outcome)`` of every journal row of a workflow, read-only."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT j.step, j.phase, j.attempt, j.outcome FROM journal j "
            "JOIN instances i ON i.n = j.n WHERE i.id = ? ORDER BY j.seq",
            (workflow_id,),
        ).fetchall()
    finally:
        conn.close()
    return [tuple(r) for r in rows]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# MQTT: a late subscriber


def retained(
    port: int, *topics: str, settle: float = 0.5, within: float = 10.0
) -> dict[str, bytes]:
    """Subscribe to ``topics`` (filters allowed) as a fresh client and return the retained messages
    the broker hands over, by topic. Empty retained payloads (cleared topics) are left out."""
    got: dict[str, bytes] = {}
    subscribed = threading.Event()
    connected = threading.Event()
    lock = threading.Lock()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            connected.set()

    def on_message(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        if m.retain and m.payload:
            with lock:
                got[m.topic] = bytes(m.payload)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:10]}")
    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    try:
        client.connect(HOST, port, 30)
        client.loop_start()
        if not connected.wait(within):
            raise AssertionError(f"could not connect to the broker on port {port}")
        client.subscribe([(t, 1) for t in topics])
        if not subscribed.wait(within):
            raise AssertionError("no SUBACK from the broker")
        time.sleep(settle)  # retained messages follow the SUBACK at once
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
        client._reset_sockets()  # close now, not at garbage collection (ResourceWarning)
    with lock:
        return dict(got)
