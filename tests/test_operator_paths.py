"""One operator path: the same mistake gets the same error (code and sentence) from MQTT, from the
control socket and from the CLI without a running agent, since all three hand the command to one
``Control``.

A real Mosquitto and a real ``edgesaga run`` subprocess serve the first two paths; the third is
``edgesaga`` run against a database of its own that no agent drives. Both databases hold a
COMPLETED workflow ``done-1``, so the mistakes that depend on a workflow's status are the same
mistake on every path.

Codes a CLI user cannot cause (its arguments are parsed and encoded by the CLI itself:
``invalid_json``, ``unknown_command``, ``payload_too_large``; it picks a new request id per call:
``request_id_conflict``) are compared over MQTT and the socket only. ``disk_full`` and
``internal_error`` need a broken disk or a bug, and have their own tests
(test_disk_full_paths.py, test_fail_safe.py).
"""

from __future__ import annotations

import json
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests._broker import HOST, Broker, unique_prefix
from tests.flows.service.harness import AgentProcess, agent_process, cli, poll, write_config

pytestmark = pytest.mark.timeout(60)

DEVICE = "paths-dev"


class Mqtt:
    """A blocking MQTT 5 caller: a command with a response topic, then its reply."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.reply_topic = f"replies/{prefix}/paths"
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.published: queue.Queue[tuple[str, bytes]] = queue.Queue()  # events, alerts, state
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"paths-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(HOST, port, 30)
        self.client.loop_start()
        self.client.subscribe(
            [(self.reply_topic, 1), (f"{prefix}/{DEVICE}/events", 1), (f"{prefix}/+/+/+/state", 1)]
        )
        assert subscribed.wait(10), "no SUBACK for the reply topic"

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        if m.topic == self.reply_topic:
            self.replies.put(json.loads(m.payload))
        else:
            self.published.put((m.topic, bytes(m.payload)))

    def wait_published(self, topic: str, within: float = 10.0) -> dict[str, Any]:
        """The next message the agent published on ``topic``."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                got, payload = self.published.get(timeout=left)
            except queue.Empty:
                break
            if got == topic and payload:
                value: dict[str, Any] = json.loads(payload)
                return value
        raise AssertionError(f"nothing published on {topic} within {within} s")

    def call(self, name: str, payload: bytes, within: float = 5.0) -> dict[str, Any] | None:
        """Publish ``payload`` on ``cmd/<name>``; the reply, or None after ``within`` seconds."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        self.client.publish(f"{self.prefix}/{DEVICE}/cmd/{name}", payload, 1, False, props)
        try:
            return self.replies.get(timeout=within)
        except queue.Empty:
            return None

    def command(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        body = {"request_id": f"mqtt-{uuid.uuid4()}", **fields}
        reply = self.call(name, json.dumps(body).encode())
        assert reply is not None, f"no MQTT reply to {name} {fields}"
        return reply

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Paths(NamedTuple):
    agent: AgentProcess
    mqtt: Mqtt
    offline: Path  # the config of the database no agent drives


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    directory = tmp_path_factory.mktemp("operator-paths")
    broker = Broker(directory / "broker")
    broker.start()
    prefix = unique_prefix()
    config = write_config(
        directory / "online",
        device_id=DEVICE,
        mqtt={"port": broker.port, "topic_prefix": prefix},
    )
    offline = write_config(directory / "offline", device_id=DEVICE)
    try:
        with agent_process(config) as agent:
            agent.wait_ready()
            mqtt = Mqtt(broker.port, prefix)
            try:
                # Until the agent has subscribed, a command finds nobody: ask until one answers.
                ping = b'{"request_id": "ping"}'
                poll(lambda: mqtt.call("list", ping, within=0.5), bool, what="the MQTT link")
                agent.start("ServiceQuick", workflow_id="done-1")
                agent.wait_status("done-1", "COMPLETED")
                made = cli(offline, "start", "ServiceQuick", "--id", "done-1")
                assert made.returncode == 0, made.stderr
                yield Paths(agent, mqtt, offline)
            finally:
                mqtt.close()
    finally:
        broker.stop()


class Mistake(NamedTuple):
    code: str
    command: str
    fields: dict[str, Any]
    argv: tuple[str, ...]  # the same mistake on the command line


MISTAKES = [
    Mistake("unknown_workflow_type", "start", {"workflow_type": "Bogus"}, ("start", "Bogus")),
    Mistake(
        "invalid_data",
        "start",
        {"workflow_type": "ServiceQuick", "data": {"seconds": "soon"}},
        ("start", "ServiceQuick", "--data", '{"seconds": "soon"}'),
    ),
    Mistake(
        "invalid_command",
        "start",
        {"workflow_type": "ServiceQuick", "data": {}, "workflow_id": "has space"},
        ("start", "ServiceQuick", "--id", "has space"),
    ),
    Mistake("invalid_command", "list", {"limit": 5000}, ("list", "--limit", "5000")),
    Mistake("not_found", "get", {"workflow_id": "nope"}, ("get", "nope")),
    Mistake("not_found", "cancel", {"workflow_id": "nope"}, ("cancel", "nope")),
    Mistake("not_found", "retry", {"workflow_id": "nope"}, ("retry", "nope")),
    Mistake("not_found", "resume", {"workflow_id": "nope", "data": {}}, ("resume", "nope")),
    Mistake("invalid_transition", "cancel", {"workflow_id": "done-1"}, ("cancel", "done-1")),
    Mistake("invalid_transition", "retry", {"workflow_id": "done-1"}, ("retry", "done-1")),
    Mistake(
        "invalid_transition", "resume", {"workflow_id": "done-1", "data": {}}, ("resume", "done-1")
    ),
]


def _error(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


def _cli_error(config: Path, argv: tuple[str, ...]) -> tuple[str, str]:
    result = cli(config, *argv)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    found = re.fullmatch(r"edgesaga: error: (.*) \(([a-z_]+)\)", lines[0])
    assert found is not None, lines[0]
    return found[2], found[1]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: f"{m.code}-{m.argv[0]}")
def test_the_same_mistake_gets_the_same_error_on_every_path(paths: Paths, mistake: Mistake) -> None:
    before = _ids(paths)
    over_mqtt = _error(paths.mqtt.command(mistake.command, mistake.fields))
    over_socket = _error(
        paths.agent.request(mistake.command, request_id=f"s-{uuid.uuid4()}", **mistake.fields)
    )
    without_agent = _cli_error(paths.offline, mistake.argv)
    assert over_mqtt[0] == mistake.code, over_mqtt
    assert over_socket == over_mqtt
    assert without_agent == over_mqtt
    assert _ids(paths) == before  # nothing was started on any path


def _ids(paths: Paths) -> tuple[list[str], list[str]]:
    """The workflow ids in the agent's database and in the one without an agent."""
    online = [r["workflow_id"] for r in paths.agent.request("list")["workflows"]]
    offline = [r["workflow_id"] for r in json.loads(cli(paths.offline, "list", "--json").stdout)]
    return online, offline


def _socket_line(agent: AgentProcess, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(agent.socket_path))
        s.sendall(line + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "the agent closed the connection without a reply"
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


@pytest.mark.parametrize(
    ("code", "name", "payload"),
    [
        ("invalid_json", "start", b'{"command": "start", "request_id": '),
        ("invalid_json", "list", b"\xff\xfe not text"),
        ("invalid_json", "list", b"[" * 10_000 + b"]" * 10_000),
        (
            "payload_too_large",
            "start",
            b'{"command": "start", "request_id": "r-big", "data": {"x": "' + b"y" * 70_000 + b'"}}',
        ),
    ],
    ids=["truncated", "not-utf8", "too-deep", "too-large"],
)
def test_malformed_commands_get_the_same_error_over_mqtt_and_the_socket(
    paths: Paths, code: str, name: str, payload: bytes
) -> None:
    over_mqtt = paths.mqtt.call(name, payload)
    assert over_mqtt is not None
    assert _error(over_mqtt)[0] == code, over_mqtt
    assert _error(_socket_line(paths.agent, payload)) == _error(over_mqtt)


def test_an_unknown_command_is_refused_on_both_paths(paths: Paths) -> None:
    over_mqtt = _error(paths.mqtt.command("launch", {}))
    over_socket = _error(paths.agent.request("launch", request_id="r-launch"))
    assert over_mqtt[0] == over_socket[0] == "unknown_command"
    # Each names the commands its path takes: the socket also serves pins and set_input.
    assert over_mqtt[1].startswith("Unknown command 'launch'; use one of start, cancel,")
    assert over_socket[1] == over_mqtt[1].rstrip(".") + ", pins, set_input."


def test_a_reused_request_id_is_a_conflict_on_both_paths(paths: Paths) -> None:
    fields = {"workflow_type": "ServiceQuick", "data": {}, "workflow_id": "conflict-1"}
    first = paths.agent.request("start", request_id="rid-conflict", **fields)
    assert first["ok"] is True, first
    other = {**fields, "workflow_id": "conflict-2"}
    over_socket = _error(paths.agent.request("start", request_id="rid-conflict", **other))
    over_mqtt = _error(paths.mqtt.command("start", {**other, "request_id": "rid-conflict"}))
    assert over_socket[0] == "request_id_conflict"
    assert over_mqtt == over_socket
    paths.agent.wait_status("conflict-1", "COMPLETED")


# ------------------------------------------------------------------------------------------------
# The shapes of docs/mqtt.md are those the agent sends


def _doc_examples() -> list[dict[str, Any]]:
    """Every JSON object in the ```json blocks of docs/mqtt.md (a block holds one object, or one
    per line)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text()
    found: list[dict[str, Any]] = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        try:
            found.append(json.loads(block))
        except ValueError:
            found.extend(json.loads(line) for line in block.splitlines() if line.strip())
    return found


def _keys(shape: Any) -> set[str]:
    return set(shape.__required_keys__ | shape.__optional_keys__)


def test_the_documented_list_reply_is_what_list_returns(paths: Paths) -> None:
    from agent._messages import Summary

    (documented,) = [e for e in _doc_examples() if "workflows" in e]
    reply = paths.mqtt.command("list", {"limit": 5})
    assert set(reply) == set(documented) == {"request_id", "ok", "workflows", "next_cursor"}
    assert reply["workflows"], reply
    for row in [*reply["workflows"], *documented["workflows"]]:
        assert set(row) == _keys(Summary), row  # summaries, not state snapshots


def test_the_documented_event_and_state_snapshot_have_the_message_shapes() -> None:
    from agent._messages import ErrorReply, Event, StateSnapshot

    examples = _doc_examples()
    (event,) = [e for e in examples if "event" in e]
    assert set(event) == _keys(Event)
    (state,) = [e for e in examples if "current_step" in e and "seq" in e]
    assert set(state) == _keys(StateSnapshot)
    errors = [e for e in examples if e.get("ok") is False]
    assert errors
    assert all(set(e) == _keys(ErrorReply) for e in errors)


def test_the_events_and_state_the_agent_publishes_have_the_message_shapes(paths: Paths) -> None:
    from agent._messages import Event, StateSnapshot

    reply = paths.mqtt.command(
        "start", {"workflow_type": "ServiceQuick", "data": {}, "workflow_id": "shapes-1"}
    )
    assert reply["ok"] is True, reply
    event = paths.mqtt.wait_published(f"{paths.mqtt.prefix}/{DEVICE}/events")
    assert set(event) == _keys(Event), event
    state = paths.mqtt.wait_published(f"{paths.mqtt.prefix}/{DEVICE}/workflows/shapes-1/state")
    assert set(state) == _keys(StateSnapshot), state
    paths.agent.wait_status("shapes-1", "COMPLETED")
