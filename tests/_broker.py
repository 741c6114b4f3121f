"""A real Mosquitto per test, MQTT test clients and the in-process agent harness.

Loaded as a pytest plugin (``pytest_plugins`` in conftest.py). Each broker listens on a free
loopback port with a config in the test's temp directory: never the system Mosquitto on 1883.

* ``broker_factory(tls=..., users=..., persistence=..., port=...)`` starts one; ``broker`` is a
  plain one. ``Broker.kill()`` is SIGKILL, ``restart()`` starts it again on the same port,
  ``save()`` (SIGUSR1) makes a persistent broker write its sessions to disk.
* ``Probe`` is an independent paho client (its own network thread) for publishing commands and
  collecting what the agent publishes.
* ``running_agent(...)`` runs store + builder + runner + control + MQTT link in one TaskGroup.
* ``unique_prefix()`` makes topics unique per test (aiomqtt's ``unique_topic()`` idea).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent._control import Control
from agent._engine import WorkflowBuilder
from agent._mqtt import MqttLink, MqttSettings, TlsSettings
from agent._runner import Runner
from agent._store import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
# Test step modules are imported by dotted path (tests.flows.slow.steps): keep the repository
# root importable also when pytest is started from elsewhere (as tests/_engine_fixtures.py does).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PAYMENT = ROOT / "workflows" / "payment"
SLOW = ROOT / "tests" / "flows" / "slow" / "slow.yaml"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"

#: The payment saga's data from the brief.
PAYMENT_DATA = {"order_id": "O1", "customer_id": "C1", "amount": 10.0}
PAYMENT_STEPS = ["Create_Order", "Charge_Payment", "Reserve_Inventory", "Create_Shipment"]


def unique_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------
# Mosquitto


class Broker:
    """One Mosquitto process on ``127.0.0.1:port`` (TLS when ``tls``)."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        tls: bool = False,
        users: dict[str, str] | None = None,
        persistence: bool = False,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.users = users or {}
        self.persistence = persistence
        self.log_file = directory / "mosquitto.log"
        self.conf = directory / "mosquitto.conf"
        self.ca_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [f"listener {self.port} {HOST}"]
        if os.geteuid() == 0:
            lines.append("user root")  # stay root: the temp files are root's
        if self.tls:
            import trustme

            ca = trustme.CA()
            server = ca.issue_cert(HOST, "localhost")
            self.ca_file = self.directory / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            server.cert_chain_pems[0].write_to_path(str(self.directory / "server.pem"))
            server.private_key_pem.write_to_path(str(self.directory / "server.key"))
            lines += [
                f"cafile {self.ca_file}",
                f"certfile {self.directory / 'server.pem'}",
                f"keyfile {self.directory / 'server.key'}",
            ]
        if self.users:
            pw = self.directory / "passwd"
            first = True
            for user, password in self.users.items():
                args = [MOSQUITTO_PASSWD, *(["-c"] if first else []), "-b", str(pw), user, password]
                subprocess.run(args, check=True, capture_output=True, timeout=10)
                first = False
            pw.chmod(0o600)
            lines += [f"password_file {pw}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        if self.persistence:
            store = self.directory / "persist"
            store.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {store}/",
                "autosave_interval 3600",
            ]
        lines += [
            "max_queued_messages 100000",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, "the broker is already running"
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited ({self._proc.returncode}):\n{self.log_text()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((HOST, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, nothing saved."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port with the same config (and persistence directory)."""
        self.kill()
        self.start()

    def save(self) -> None:
        """Make a persistent broker write its in-memory state to disk now (SIGUSR1)."""
        assert self.persistence
        assert self.running
        db = self.directory / "persist" / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        self._proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if db.exists() and db.stat().st_mtime_ns != before:
                time.sleep(0.05)
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not save its persistence file")

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def settings(self, prefix: str, **overrides: Any) -> MqttSettings:
        """MqttSettings for this broker (TLS pointing at its CA)."""
        values: dict[str, Any] = {"host": HOST, "port": self.port, "topic_prefix": prefix}
        if self.tls:
            values["tls"] = TlsSettings(ca_file=self.ca_file)
        values.update(overrides)
        return MqttSettings(**values)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start Mosquitto brokers; all are stopped after the test."""
    made: list[Broker] = []

    def make(**kwargs: Any) -> Broker:
        broker = Broker(tmp_path / f"broker{len(made)}", **kwargs)
        made.append(broker)
        broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A plain Mosquitto (anonymous, no TLS) on a free loopback port."""
    return broker_factory()


# ------------------------------------------------------------------------------------------------
# An independent MQTT client for tests


@dataclasses.dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    response_topic: str | None
    correlation: bytes | None
    at: float  # time.perf_counter() when it reached the loop

    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    """A paho client on its own network thread; what it receives lands in ``messages``."""

    def __init__(
        self,
        broker: Broker,
        *,
        version: str = "5",
        client_id: str | None = None,
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.broker = broker
        self.version = version
        self.persistent = persistent
        self.messages: list[Received] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._connected = asyncio.Event()
        v5 = version == "5"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not persistent,
            reconnect_on_failure=persistent,
        )
        self.client.reconnect_delay_set(1, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        if broker.tls:
            ctx = ssl.create_default_context(cafile=str(broker.ca_file))
            self.client.tls_set_context(ctx)
        self.client.on_message = self._t_message
        self.client.on_subscribe = self._t_subscribe
        self.client.on_connect = self._t_connect
        self.client.on_disconnect = self._t_disconnect

    def _t_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        props = m.properties
        received = Received(
            m.topic,
            bytes(m.payload),
            bool(m.retain),
            m.qos,
            getattr(props, "ResponseTopic", None) if props is not None else None,
            getattr(props, "CorrelationData", None) if props is not None else None,
            time.perf_counter(),
        )
        self._loop.call_soon_threadsafe(self._add, received)

    def _add(self, received: Received) -> None:
        self.messages.append(received)
        self._changed.set()

    def _t_subscribe(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self._loop.call_soon_threadsafe(self._suback, mid)

    def _suback(self, mid: int) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _t_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self._loop.call_soon_threadsafe(self._connected.set)

    def _t_disconnect(self, *_a: Any) -> None:
        self._loop.call_soon_threadsafe(self._connected.clear)

    async def connect(self) -> Probe:
        if self.version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600 if self.persistent else 0
            await asyncio.to_thread(
                self.client.connect,
                HOST,
                self.broker.port,
                30,
                clean_start=not self.persistent,
                properties=props,
            )
        else:
            await asyncio.to_thread(self.client.connect, HOST, self.broker.port, 30)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # Nagle off, as the agent does
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def wait_connected(self, within: float = 15) -> None:
        await asyncio.wait_for(self._connected.wait(), within)

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        rc, mid = self.client.subscribe([(t, qos) for t in topics])
        assert rc == 0
        assert mid is not None
        fut = self._loop.create_future()
        self._subacks[mid] = fut
        await asyncio.wait_for(fut, 10)

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> paho.MQTTMessageInfo:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        return self.client.publish(topic, payload, qos, retain, props)

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], within: float = 10
    ) -> None:
        """Wait up to ``within`` seconds until ``predicate(messages)`` holds."""
        deadline = time.monotonic() + within
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"condition not met in {within} s; got {len(self.messages)} messages"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
        self.client._reset_sockets()  # close now, not at garbage collection (ResourceWarning)


@contextlib.asynccontextmanager
async def probe(broker: Broker, *topics: str, **kwargs: Any) -> AsyncIterator[Probe]:
    p = Probe(broker, **kwargs)
    try:
        await p.connect()
        if topics:
            await p.subscribe(*topics)
        yield p
    finally:
        await p.close()


def payload_of(message: Received) -> dict[str, Any]:
    value = message.json()
    assert isinstance(value, dict)
    return value


# ------------------------------------------------------------------------------------------------
# The agent, in process


@dataclasses.dataclass
class Agent:
    store: SQLiteStore
    builder: WorkflowBuilder
    runner: Runner
    control: Control
    link: MqttLink
    link_task: asyncio.Task[None]
    runner_task: asyncio.Task[None]

    async def wait_finished(self, count: int, within: float = 15) -> None:
        """Wait until ``count`` workflows are in a terminal status."""
        deadline = time.monotonic() + within
        while True:
            finished = [
                r for r in await self.store.list_instances(limit=100_000) if r.status.is_terminal
            ]
            if len(finished) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(finished)} of {count} workflows finished")
            await asyncio.sleep(0.05)

    async def wait_outbox_empty(self, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while await self.store.outbox_count():
            if time.monotonic() > deadline:
                raise TimeoutError("the outbox did not drain")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_agent(
    db: Path,
    settings: MqttSettings,
    *,
    device: str = "dev1",
    definitions: Sequence[Path] = (PAYMENT,),
    max_concurrent: int = 8,
    **link_kwargs: Any,
) -> AsyncIterator[Agent]:
    """The agent in one TaskGroup: ``runner.serve()`` and ``link.run()``."""
    error: Exception | None = None
    async with SQLiteStore(db) as store:
        builder = WorkflowBuilder(definitions=definitions)
        runner = Runner(max_concurrent=max_concurrent)
        control = Control(
            builder=builder, store=store, runner=runner, max_payload=settings.max_payload
        )
        link = MqttLink(
            settings=settings,
            device_id=device,
            store=store,
            handler=control.handle_raw,
            **link_kwargs,
        )
        async with asyncio.TaskGroup() as tg:
            runner_task = tg.create_task(runner.serve(), name="runner")
            link_task = tg.create_task(link.run(), name="mqtt-link")
            agent = Agent(store, builder, runner, control, link, link_task, runner_task)
            try:
                yield agent
            except Exception as exc:  # re-raised below, not wrapped in an ExceptionGroup
                error = exc
            finally:
                link_task.cancel()
                await runner.stop(grace=1.0)
    if error is not None:
        raise error


async def until(predicate: Callable[[], Any], *, within: float, every: float = 0.02) -> None:
    """Poll ``predicate()`` (sync or async) until it is true; TimeoutError after ``within`` s.
    For conditions with no notification to wait on (log records, counters, printed output)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(every)


def start_command(
    request_id: str, data: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "workflow_type": extra.pop("workflow_type", "PaymentProcessing"),
        "data": PAYMENT_DATA if data is None else data,
        **extra,
    }


def events_of(messages: list[Received], workflow_id: str) -> list[dict[str, Any]]:
    """Payloads of the events of one workflow, in arrival order, duplicates (same seq) removed."""
    seen: set[int] = set()
    out = []
    for m in messages:
        if not m.topic.endswith("/events"):
            continue
        p = payload_of(m)
        if p.get("workflow_id") == workflow_id and p["seq"] not in seen:
            seen.add(p["seq"])
            out.append(p)
    return out


def completed_sequence(steps: Sequence[str] = PAYMENT_STEPS) -> list[tuple[str, str | None]]:
    """(event, step) of a workflow that completes every step on its first attempt."""
    seq: list[tuple[str, str | None]] = [("workflow_started", steps[0])]
    for step in steps:
        seq += [("step_started", step), ("step_completed", step)]
    return [*seq, ("status_changed", None)]
