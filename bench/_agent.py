"""A real ``edgesaga run`` for the benchmarks: started with this process as its NOTIFY_SOCKET,
returned once it sent READY=1, stopped with SIGTERM (the benchmarks measure whole processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])  # kB
    return out


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGESAGA_", "NOTIFY_SOCKET", "WATCHDOG_", "GPIOZERO_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


@dataclass
class AgentProcess:
    label: str  # the benchmark's name, for its messages
    proc: subprocess.Popen[bytes]
    started: float  # perf_counter at exec
    ready_s: float  # exec to READY=1
    socket: Path  # the control socket
    log: Path
    closers: list[Callable[[], None]] = field(default_factory=list)
    rss_kb: int = 0  # VmRSS at READY=1

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(
                f"{self.label}: the agent exited (status {self.proc.returncode}); see {self.log}"
            )

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 60 s) and close what it held; its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for close in self.closers:
            close()
        return self.proc.returncode


def offline_config(
    directory: Path, db: Path, *, device_id: str, definitions: Path, **more: Any
) -> Path:
    """Write ``directory/agent.yaml`` for a benchmark agent: its database, control socket and
    definitions (nothing bundled), 32 workflows at a time, no MQTT, only warnings logged; ``more``
    adds top-level sections (``retention``, say). Returns its path."""
    config: dict[str, Any] = {
        "device_id": device_id,
        "database": str(db),
        "control_socket": str(directory / "control.sock"),
        "definitions": [str(definitions)],
        "python_path": [str(Path(__file__).resolve().parents[1])],
        "include_bundled": False,
        "max_concurrent": 32,
        "logging": {"level": "WARNING"},
        "mqtt": {"enabled": False},
        **more,
    }
    path = directory / "agent.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_agent(config: Path, directory: Path, *, label: str, within: float) -> AgentProcess:
    """``edgesaga run --config CONFIG``, its log in DIRECTORY/agent.log; returns at READY=1, or
    exits naming the log when the agent dies or sends nothing within WITHIN seconds."""
    name = f"edgesaga-{label}-{uuid.uuid4().hex}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + name)
    log_path = directory / "agent.log"
    log = log_path.open("ab")
    env = _env()
    env["NOTIFY_SOCKET"] = "@" + name
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    agent = AgentProcess(
        label, proc, t0, 0.0, directory / "control.sock", log_path, [notify.close, log.close]
    )
    try:
        deadline = time.monotonic() + within
        notify.settimeout(0.1)
        while True:
            try:
                data = notify.recv(65536)
            except TimeoutError:
                agent.alive()
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"{label}: no READY=1 within {within:g} s; see {log_path}"
                    ) from None
                continue
            if b"READY=1" in data.split(b"\n"):
                agent.ready_s = time.perf_counter() - t0
                agent.rss_kb = _proc_status(proc.pid)["VmRSS"]
                return agent
    except BaseException:
        agent.stop()
        raise
