"""Footprint of ``edgesaga run``: idle memory and start-up time, beside bare Python baselines.

    python bench/footprint.py [--runs N] [--idle SECONDS]

Starts its own Mosquitto on a free loopback port and writes an agent config in a temporary
directory (mock pins through the ``hardware`` section, MQTT enabled and pointing at that broker,
the bundled workflows). Each of three programs is run ``--runs`` times, interleaved, and the medians
are printed:

* ``python -c pass``
* a bare import of the agent's dependencies
  (``import pydantic, yaml, paho.mqtt.client, gpiozero, sqlite3, asyncio``)
* ``edgesaga run --config <tmp>/agent.yaml``

How each is measured, the same way for all three:

* **time**: from just before ``exec`` (``subprocess.Popen``) until the program says it is ready.
  The agent says so with ``READY=1`` on ``NOTIFY_SOCKET`` (a datagram socket owned by this script,
  as systemd would own it); the baselines write one byte to stdout after their imports.
* **RSS**: ``VmRSS`` from ``/proc/<pid>/status`` while the program idles, alive. The agent is read
  after READY=1, once its control socket reports ``mqtt_connected: true``, plus ``--idle`` seconds
  (default 2). The baselines are read right after their ready byte; they then wait for stdin to
  close. ``VmHWM`` (the peak) is shown beside it.

Targets (printed with PASS/FAIL; the exit status is 1 when one fails):
idle RSS <= bare-import RSS + 10 MB, and exec->READY <= 1.5 x bare-import time. The time ratio
judged is the median over the runs of each agent start divided by the bare import run just before
it: on a shared machine the speed of both drifts within seconds, and a pair run back to back sees
the same drift. The ratio of the medians is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent._socket import request  # noqa: E402  (the CLI's client for the control socket)
from bench._agent import _env, _proc_status, start_agent  # noqa: E402
from bench._broker import HOST, mosquitto  # noqa: E402

DEPENDENCIES = "import pydantic, yaml, paho.mqtt.client, gpiozero, sqlite3, asyncio"
# The baselines announce readiness with one byte on stdout, then block until stdin closes. `os` is
# already imported by Python's start-up (site), so this adds nothing to what is measured.
HOLD = "import os; os.write(1, b'R'); os.read(0, 1)"
RSS_TARGET_MB = 10.0
TIME_TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Sample:
    seconds: float  # exec -> ready
    rss_kb: int  # VmRSS while idle
    hwm_kb: int  # VmHWM (peak RSS) at the same moment


# ------------------------------------------------------------------------------------------------
# Measurements


def measure_python(code: str) -> Sample:
    """``python -c <code>; <HOLD>``: time to the ready byte, VmRSS right after it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{code}\n{HOLD}"],
        cwd=ROOT,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        if proc.stdout.read(1) != b"R":
            raise SystemExit(f"footprint: `python -c {code!r}` failed (exit {proc.wait()}).")
        seconds = time.perf_counter() - t0
        status = _proc_status(proc.pid)
        proc.stdin.close()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    return Sample(seconds, status["VmRSS"], status["VmHWM"])


def write_config(directory: Path, broker_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "device_id": "footprint",
        "database": str(directory / "edgesaga.db"),
        "control_socket": str(directory / "control.sock"),
        "logging": {"level": "WARNING"},
        "mqtt": {"enabled": True, "host": HOST, "port": broker_port, "topic_prefix": "footprint"},
        "hardware": {
            "pin_factory": "mock",
            "devices": {
                "valve": {"kind": "output", "pin": 17, "safe": False},
                "pump": {"kind": "output", "pin": 27, "safe": False},
                "level": {"kind": "input", "pin": 22, "pull_up": True},
            },
        },
    }
    path = directory / "agent.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def measure_agent(directory: Path, broker_port: int, idle: float) -> Sample:
    """``edgesaga run``: time to READY=1, VmRSS after it connected to the broker and idled."""
    agent = start_agent(
        write_config(directory, broker_port), directory, label="footprint", within=30
    )
    try:
        deadline = time.monotonic() + 30
        while not request(agent.socket, "status", timeout=5).get("mqtt_connected"):
            if time.monotonic() > deadline:
                raise SystemExit("footprint: the agent did not connect to the broker within 30 s.")
            time.sleep(0.05)
        time.sleep(idle)
        status = _proc_status(agent.proc.pid)
    finally:
        code = agent.stop()
    if code != 0:
        raise SystemExit(f"footprint: the agent exited with {code}; see {agent.log}")
    return Sample(agent.ready_s, status["VmRSS"], status["VmHWM"])


# ------------------------------------------------------------------------------------------------


def _median(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.seconds for s in samples),
        int(statistics.median(s.rss_kb for s in samples)),
        int(statistics.median(s.hwm_kb for s in samples)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=11, help="runs of each program (median; default 11)"
    )
    parser.add_argument(
        "--idle", type=float, default=2.0, help="seconds the agent idles before RSS is read"
    )
    args = parser.parse_args(argv)
    # An installed agent has byte-compiled modules (pip compiles at install, install.sh uses pip);
    # a checkout run with PYTHONDONTWRITEBYTECODE=1 would recompile ours on every start. Compile
    # them once so the agent is measured as deployed (the dependencies are already compiled).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            *(str(ROOT / p) for p in ("agent", "hardware", "workflows")),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    results: dict[str, list[Sample]] = {"pass": [], "bare": [], "agent": []}
    with tempfile.TemporaryDirectory(prefix="edgesaga-footprint-") as tmp:
        base = Path(tmp)
        with mosquitto() as broker_port:
            measure_python(DEPENDENCIES)  # warm the page cache and .pyc files once, unmeasured
            measure_agent(base / "warm", broker_port, 0.0)
            for i in range(args.runs):
                results["pass"].append(measure_python("pass"))
                results["bare"].append(measure_python(DEPENDENCIES))
                results["agent"].append(measure_agent(base / f"run{i}", broker_port, args.idle))

    p, b, a = (_median(results[k]) for k in ("pass", "bare", "agent"))
    print(
        f"edgesaga footprint: median of {args.runs} runs each, Python {sys.version.split()[0]}, {os.uname().machine}"
    )
    print(f"{'program':<44} {'exec->ready':>12} {'VmRSS':>10} {'VmHWM':>10}")
    rows = [
        ("python -c pass", p),
        (f"python -c '{DEPENDENCIES}'", b),
        ("edgesaga run (mock pins, MQTT connected)", a),
    ]
    for label, s in rows:
        label = label if len(label) <= 44 else label[:41] + "..."
        print(
            f"{label:<44} {s.seconds * 1000:>9.0f} ms {s.rss_kb / 1024:>7.1f} MB {s.hwm_kb / 1024:>7.1f} MB"
        )
    print(f"  (bare import = python -c '{DEPENDENCIES}')")

    rss_limit = b.rss_kb / 1024 + RSS_TARGET_MB
    rss_ok = a.rss_kb / 1024 <= rss_limit
    paired = statistics.median(
        agent.seconds / bare.seconds
        for agent, bare in zip(results["agent"], results["bare"], strict=True)
    )
    time_ok = paired <= TIME_TARGET_RATIO
    print()
    print(
        f"target idle RSS <= bare-import RSS + {RSS_TARGET_MB:.0f} MB: {a.rss_kb / 1024:.1f} MB <= "
        f"{rss_limit:.1f} MB (agent adds {(a.rss_kb - b.rss_kb) / 1024:.1f} MB)  {'PASS' if rss_ok else 'FAIL'}"
    )
    print(
        f"target exec->READY <= {TIME_TARGET_RATIO} x bare-import time: {paired:.2f} x, median of "
        f"{args.runs} back-to-back pairs (ratio of the medians {a.seconds / b.seconds:.2f} x)  "
        f"{'PASS' if time_ok else 'FAIL'}"
    )
    return 0 if rss_ok and time_ok else 1


if __name__ == "__main__":
    sys.exit(main())
