"""MQTT latency: a `start` command to the first `step_started` event and to `COMPLETED`.

    python bench/mqtt_latency.py [--runs N] [--version 5|3.1.1] [--dir DIR]

Starts its own Mosquitto on a free loopback port and runs the agent in process (SQLite store,
runner, control, MQTT link) with the no-op payment saga (bench/noop_payment.yaml: four async
no-op steps, so the figures are the agent's and the broker's cost, not the steps'). A separate
paho client (its own network thread, in this process) sends one `start` at a time and timestamps
the events it receives. Beside them: the raw broker round trip (QoS 1 publish to a topic the same
client subscribes to) measured in the same run, i.e. the floor any command/event path pays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent._control import Control  # noqa: E402
from agent._engine import WorkflowBuilder  # noqa: E402
from agent._mqtt import MqttLink, MqttSettings, Topics  # noqa: E402
from agent._runner import Runner  # noqa: E402
from agent._store import SQLiteStore  # noqa: E402
from bench._broker import HOST, mosquitto, mosquitto_version  # noqa: E402

NOOP = ROOT / "bench" / "noop_payment.yaml"
DEVICE = "bench"


class Watcher:
    """A paho client on its own thread; records when each watched message arrives."""

    def __init__(self, port: int, version: str) -> None:
        self.arrivals: dict[tuple[str, str], float] = {}
        self._cond = threading.Condition()
        v5 = version == "5"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-watch-{os.getpid()}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, 30)
        # Nagle off, as the agent does: otherwise each hop may wait ~40 ms for a delayed ACK.
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        if msg.topic.endswith("/events"):
            p = json.loads(msg.payload)
            key = (p["workflow_id"], p["event"] if p["event"] != "status_changed" else p["status"])
        else:
            key = (msg.topic, msg.payload.decode())
        with self._cond:
            self.arrivals.setdefault(key, now)
            self._cond.notify_all()

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            info = self.client.subscribe(topic, 1)
            assert info[0] == 0
        time.sleep(0.2)  # SUBACKs (a benchmark may be this simple)

    def wait(self, key: tuple[str, str], timeout: float = 10.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self.arrivals, timeout):
                raise TimeoutError(f"no {key} within {timeout} s")
            return self.arrivals[key]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] * 1000


async def run(port: int, runs: int, version: str, directory: Path) -> dict[str, list[float]]:
    settings = MqttSettings(host=HOST, port=port, version=version, topic_prefix="bench")
    topics = Topics("bench", DEVICE)
    async with SQLiteStore(directory / "latency.db") as store:
        builder = WorkflowBuilder(definitions=[NOOP])
        runner = Runner(max_concurrent=8)
        control = Control(builder=builder, store=store, runner=runner)
        link = MqttLink(
            settings=settings, device_id=DEVICE, store=store, handler=control.handle_raw
        )
        results: dict[str, list[float]] = {"rtt": [], "first": [], "done": []}
        async with asyncio.TaskGroup() as tg:
            serve = tg.create_task(runner.serve(), name="runner")
            link_task = tg.create_task(link.run(), name="mqtt-link")
            await asyncio.wait_for(link.connected_event.wait(), 10)
            watcher = await asyncio.to_thread(Watcher, port, version)
            try:
                await asyncio.to_thread(watcher.subscribe, topics.events, "bench/rtt")
                for i in range(-10, runs):  # 10 warm-up runs, not counted
                    t0 = time.perf_counter()
                    watcher.client.publish("bench/rtt", str(i), qos=1)
                    t1 = await asyncio.to_thread(watcher.wait, ("bench/rtt", str(i)))
                    wid = f"lat-{i}"
                    command = {
                        "request_id": wid,
                        "workflow_id": wid,
                        "workflow_type": "NoopPayment",
                        "data": {},
                    }
                    t2 = time.perf_counter()
                    watcher.client.publish(
                        topics.command_base + "start", json.dumps(command), qos=1
                    )
                    first = await asyncio.to_thread(watcher.wait, (wid, "step_started"))
                    done = await asyncio.to_thread(watcher.wait, (wid, "COMPLETED"))
                    if i >= 0:
                        results["rtt"].append(t1 - t0)
                        results["first"].append(first - t2)
                        results["done"].append(done - t2)
            finally:
                await asyncio.to_thread(watcher.close)
                link_task.cancel()
                await runner.stop(grace=1.0)
                assert serve.done() or True
        return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--version", choices=["5", "3.1.1"], default="5")
    ap.add_argument(
        "--dir", default=None, help="directory for the SQLite file (default: a temp dir)"
    )
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(dir=args.dir, prefix="edgesaga-latency-") as tmp,
        mosquitto() as port,
    ):
        r = asyncio.run(run(port, args.runs, args.version, Path(tmp)))
        print(
            f"MQTT latency: {args.runs} sequential runs, MQTT {args.version}, {mosquitto_version()} on {HOST}, "
            f"store in {tmp}"
        )
        print(f"{'path':<40}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
        for label, key in (
            ("broker round trip (QoS 1 pub -> sub)", "rtt"),
            ("start -> first step_started event", "first"),
            ("start -> status_changed COMPLETED", "done"),
        ):
            values = r[key]
            print(
                f"{label:<40}{pct(values, 0.5):9.2f}{pct(values, 0.99):9.2f}{statistics.fmean(values) * 1000:9.2f}"
            )


if __name__ == "__main__":
    os.environ.pop("PYTHONASYNCIODEBUG", None)  # debug mode would measure asyncio's checks
    main()
