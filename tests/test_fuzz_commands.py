"""Fuzzing commands on both of a real agent's command paths: the control socket and MQTT (issue 10,
acceptance: "only documented errors, never a crash, a hang or a traceback").

One ``edgesaga run`` subprocess per test (mock pins, the payment saga, JSON log lines). Hypothesis
sends arbitrary JSON values, mutations of valid commands (missing, extra and wrongly typed fields,
huge strings, deep nesting, integers too long to read, odd request ids and reply addresses),
unknown command names and raw bytes that are not UTF-8 JSON. For every input:

* exactly one reply arrives within a few seconds (no hang, no connection closed without a reply);
* the reply is ``ok: true`` or carries an ``error.code`` from the table in docs/mqtt.md and a
  one-line message;
* the agent's log has no ERROR line, no exception and no traceback.

After the run the agent is still the same process, it never lost its broker connection, and a
valid ``list`` succeeds. Bounded: a fixed number of examples per path, well under 30 s each.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent._commands import COMMANDS
from tests._broker import HOST, PAYMENT, PAYMENT_DATA, Broker, unique_prefix
from tests.flows.service.harness import AgentProcess, agent_process, write_config

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "fuzz-dev"
MAX_PAYLOAD = 65536
REPLY_WITHIN = 5.0  # seconds: longer is a hang
SOCKET_EXAMPLES = 400
MQTT_EXAMPLES = 300


def _documented_codes() -> frozenset[str]:
    """The codes of the error-code table in docs/mqtt.md: what "documented" means here."""
    text = (ROOT / "docs" / "mqtt.md").read_text()
    table = text.split("### Error codes", 1)[1].split("\n\n", 2)[1]
    return frozenset(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))


DOCUMENTED = _documented_codes()


# ------------------------------------------------------------------------------------------------
# Inputs


class Input:
    """One command: its name, the bytes sent, and the request id a reply may carry (None: any)."""

    __slots__ = ("how", "name", "payload", "request_id")

    def __init__(self, name: str, payload: bytes, request_id: str | None, how: str) -> None:
        self.name = name
        self.payload = payload
        self.request_id = request_id
        self.how = how  # which strategy made it (for the run's figures)

    def __repr__(self) -> str:  # a failing example, short enough to read
        shown = self.payload if len(self.payload) <= 400 else self.payload[:400] + b"..."
        return f"Input({self.name!r}, {len(self.payload)} bytes: {shown!r}, {self.how})"


_text = st.text(max_size=30)  # any code point, lone surrogates included
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=15,
)
_level = st.text(  # one MQTT topic level a client can publish to
    alphabet=st.characters(
        # Cn (unassigned) holds the noncharacters, for which the broker drops the publisher.
        min_codepoint=0x20,
        exclude_characters="/+#\x7f",
        exclude_categories=("Cs", "Cc", "Cn"),
    ),
    max_size=20,
)


def _templates() -> dict[str, dict[str, Any]]:
    """A valid body of every command (without request_id)."""
    return {
        "start": {"workflow_type": "PaymentProcessing", "data": dict(PAYMENT_DATA)},
        "cancel": {"workflow_id": "fuzz-nope", "reason": "fuzz"},
        "resume": {"workflow_id": "fuzz-nope", "data": {}},
        "retry": {"workflow_id": "fuzz-nope"},
        "get": {"workflow_id": "fuzz-nope", "journal": True},
        "list": {"status": ["ACTIVE"], "workflow_type": "PaymentProcessing", "limit": 5},
        "schedules": {},
        "status": {},
    }


def _reply_to(prefix: str) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.just(f"replies/{prefix}/rt"),
        st.sampled_from(
            [
                f"{prefix}/{DEVICE}/events",
                f"{prefix}/{DEVICE}/availability",
                f"{prefix}/{DEVICE}/cmd/start",
                f"{prefix}/other/cmd/start",
                f"{prefix}/{DEVICE}/workflows/x/state",
                "a/+/b",
                "#",
                "",
                "$SYS/x",
                "a\x01b",
                "a\ufffeb",
                "a\ufdd0b",
                "r" * 600,
            ]
        ),
        _text,
        _json,
    )


def _request_id() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.uuids().map(str),
        st.just(""),
        st.just("r" * 201),
        st.text(min_size=1, max_size=40),
        _json,
    )


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def mutated(draw: st.DrawFn, prefix: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A valid command with 1 to 4 mutations. Returns (name, body, raw JSON fragments to add)."""
    name = draw(st.sampled_from(sorted(COMMANDS)))
    body: dict[str, Any] = {"request_id": str(uuid.uuid4()), **_templates()[name]}
    raw: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 4))):
        keys = sorted(body)
        how = draw(
            st.sampled_from(
                [
                    "drop",
                    "retype",
                    "extra",
                    "huge",
                    "huge_key",
                    "deep",
                    "long_int",
                    "request_id",
                    "reply_to",
                    "command",
                    "data",
                ]
            )
        )
        match how:
            case "drop" if keys:
                del body[draw(st.sampled_from(keys))]
            case "retype" if keys:
                body[draw(st.sampled_from(keys))] = draw(_json)
            case "extra":
                body[draw(_text)] = draw(_json)
            case "huge":
                key = draw(st.sampled_from([*keys, "pad"]))
                body[key] = "x" * draw(st.sampled_from([1000, 30000, MAX_PAYLOAD - 200, 70000]))
            case "huge_key":  # field names are echoed in error messages
                body["k" * draw(st.sampled_from([100, 5000, 60000]))] = 1
            case "deep":
                key = draw(st.sampled_from([*keys, "data", "pad"]))
                raw[key] = _nested(draw(st.integers(1, 3000)))
            case "long_int":  # Python refuses to read integers of more than 4300 digits
                key = draw(st.sampled_from([*keys, "limit", "pad"]))
                raw[key] = "9" * draw(st.integers(4000, 6000))
            case "request_id":
                body["request_id"] = draw(_request_id())
            case "reply_to":
                body["reply_to"] = draw(_reply_to(prefix))
            case "command":
                body["command"] = draw(
                    st.one_of(st.sampled_from(sorted(COMMANDS)), _json, st.just("c" * 60000))
                )
            case "data":
                body["data"] = draw(
                    st.one_of(
                        st.dictionaries(
                            st.sampled_from([*PAYMENT_DATA, "fail", "currency"]), _json
                        ),
                        _json,
                    )
                )
    return name, body, raw


def _encode(body: dict[str, Any], raw: dict[str, str]) -> bytes:
    for key in raw:
        body.pop(key, None)
    text = json.dumps(body)
    if raw:
        extra = ", ".join(f"{json.dumps(k)}: {v}" for k, v in raw.items())
        text = text[:-1] + (", " if body else "") + extra + "}"
    return text.encode("utf-8", "surrogatepass")


def _rid_of(body: Any) -> str | None:
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else None


@st.composite
def command_input(draw: st.DrawFn, prefix: str, names: st.SearchStrategy[str]) -> Input:
    how = draw(st.sampled_from(["valid"] + ["mutated"] * 3 + ["any_json", "bytes", "unknown"]))
    match how:
        case "valid":  # carried out: interleaved with the rest, and must still succeed
            name = draw(st.sampled_from(["list", "start"]))
            body = {"request_id": str(uuid.uuid4()), **_templates()[name]}
            return Input(name, _encode(body, {}), body["request_id"], how)
        case "mutated":
            name, body, raw = draw(mutated(prefix))
            payload = _encode(body, raw)
            rid = _rid_of(body)
            encoding = draw(st.sampled_from(["utf-8"] * 6 + ["latin-1", "utf-16", "cut", "flip"]))
            if encoding in ("latin-1", "utf-16"):
                payload = payload.decode("utf-8", "surrogatepass").encode(encoding, "replace")
            elif encoding == "cut":
                payload = payload[: draw(st.integers(0, max(len(payload) - 1, 0)))]
            elif encoding == "flip" and payload:
                i = draw(st.integers(0, len(payload) - 1))
                payload = payload[:i] + bytes([payload[i] ^ 0x80]) + payload[i + 1 :]
            if encoding != "utf-8":
                rid = None  # whatever survived may still be read
            return Input(name, payload, rid, f"mutated/{encoding}")
        case "any_json":
            value = draw(_json)
            return Input(
                draw(st.sampled_from(sorted(COMMANDS))),
                json.dumps(value).encode("utf-8", "surrogatepass"),
                _rid_of(value),
                how,
            )
        case "bytes":
            return Input(
                draw(st.sampled_from(sorted(COMMANDS))), draw(st.binary(max_size=300)), None, how
            )
        case _:
            name = draw(names.filter(lambda n: n not in COMMANDS))
            body = {
                "request_id": str(uuid.uuid4()),
                **draw(st.dictionaries(_text, _json, max_size=3)),
            }
            return Input(name, _encode(body, {}), _rid_of(body), how)


# ------------------------------------------------------------------------------------------------
# Checks


def check_reply(reply: Any, sent: Input) -> str:
    """Assert one reply is ok or a documented error; returns "ok" or the code."""
    assert isinstance(reply, dict), reply
    assert reply.get("request_id") in (None, sent.request_id) or sent.request_id is None, reply
    if reply.get("ok") is True:
        return "ok"
    assert reply.get("ok") is False, reply
    error = reply.get("error")
    assert isinstance(error, dict), reply
    assert error.get("code") in DOCUMENTED, reply
    message = error.get("message")
    assert isinstance(message, str), reply
    assert message.strip(), reply
    assert "\n" not in message, reply  # one line: no forged log lines
    assert "Traceback" not in message, reply
    assert len(message) <= 2000, reply  # a sentence, not an echo of the input
    return str(error["code"])


class LogWatch:
    """Reads the agent's log as it grows: JSON lines (logging.format: json) and anything else the
    process wrote (a step's prints)."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.offset = 0

    def problems(self) -> list[str]:
        """New lines since the last call that are ERROR, carry an exception, or a traceback."""
        text = self.agent.log_text()
        new, self.offset = text[self.offset :], len(text)
        bad = []
        for line in new.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "level" in record:
                if record["level"] in ("ERROR", "CRITICAL") or "exception" in record:
                    bad.append(line[:2000])
            elif "Traceback" in line or "Error" in line:
                bad.append(line[:2000])
        return bad


def _config(directory: Path, **extra: Any) -> Path:
    return write_config(
        directory,
        device_id=DEVICE,
        definitions=[str(PAYMENT)],
        logging={"level": "INFO", "format": "json"},
        max_concurrent=8,
        **extra,
    )


@pytest.fixture
def fuzz_agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AgentProcess]:
    extra = getattr(request, "param", {})
    with agent_process(_config(tmp_path, **extra), test_hooks=False) as agent:
        agent.wait_ready()
        yield agent


# ------------------------------------------------------------------------------------------------
# The control socket


def _socket_line(path: Path, line: bytes) -> Any:
    """Send one request line on a fresh connection; the one reply line, parsed (None: the agent
    closed the connection without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(REPLY_WITHIN)
        s.connect(str(path))
        s.sendall(line + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        return None
    assert buf.count(b"\n") == 1, buf[:500]
    return json.loads(buf)


_socket_names = st.one_of(st.sampled_from(["pins", "set_input", "status", "_block_loop"]), _text)


@st.composite
def socket_input(draw: st.DrawFn) -> Input:
    """A request line: a command as MQTT would carry it, with its name in a "command" field; or an
    extra command of the socket; or a line that is not a JSON object with a string command."""
    how = draw(st.sampled_from(["command"] * 4 + ["extra", "no_command", "bytes"]))
    if how == "command":
        item = draw(command_input("edgesaga", _socket_names))
        try:
            body = json.loads(item.payload)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict) and "command" not in body:
            # The socket reads the name from the line: put it first, keep the rest byte for byte.
            head = json.dumps({"command": item.name})[:-1].encode()  # ASCII: escapes
            rest = item.payload.strip()[1:]  # after the opening brace
            payload = head + (b", " + rest if rest != b"}" else b"}")
            return Input(item.name, payload, item.request_id, f"socket/{item.how}")
        return Input(item.name, item.payload.replace(b"\n", b" "), None, f"socket/{item.how}")
    if how == "extra":
        name = draw(st.sampled_from(["pins", "set_input", "status", "_block_loop"]))
        fields = draw(
            st.dictionaries(
                st.sampled_from(["device", "value", "history", "seconds", "request_id", "x"]),
                st.one_of(_json, st.sampled_from(["lamp", "door", "true", "0", "maybe"])),
                max_size=4,
            )
        )
        line = json.dumps({"command": name, **fields}).encode("utf-8", "surrogatepass")
        return Input(name, line, None, "socket/extra")
    if how == "no_command":
        value = draw(
            st.one_of(_json, st.dictionaries(_text, _json).map(lambda d: {**d, "command": 1}))
        )
        return Input(
            "?", json.dumps(value).encode("utf-8", "surrogatepass"), None, "socket/no_command"
        )
    data = draw(st.binary(max_size=300)).replace(b"\n", b" ")
    return Input("?", data, None, "socket/bytes")


def test_fuzzed_socket_commands_get_documented_replies(fuzz_agent: AgentProcess) -> None:
    agent = fuzz_agent
    logs = LogWatch(agent)
    seen: Counter[str] = Counter()

    @settings(
        max_examples=SOCKET_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(socket_input())
    def one(item: Input) -> None:
        reply = _socket_line(agent.socket_path, item.payload)
        if reply is None:  # what the agent logged about it, to say why
            deadline = time.monotonic() + 2
            while not (logged := logs.problems()) and time.monotonic() < deadline:
                time.sleep(0.05)
            raise AssertionError(f"the agent closed the connection without a reply; log: {logged}")
        code = check_reply(reply, item)
        if item.how == "socket/valid":
            assert code == "ok", reply
        seen[code] += 1
        seen[item.how] += 1
        assert agent.proc.poll() is None, agent.log_text()[-3000:]
        assert logs.problems() == [], item

    one()
    assert agent.proc.poll() is None
    assert agent.request("list")["ok"] is True
    assert agent.request("status")["ok"] is True
    assert logs.problems() == []
    assert seen["ok"] > 0
    assert sum(n for k, n in seen.items() if k in DOCUMENTED) > SOCKET_EXAMPLES // 2


# ------------------------------------------------------------------------------------------------
# MQTT


class Caller:
    """A blocking MQTT 5 client: publish a command with a response topic, wait for its reply."""

    def __init__(self, broker: Broker, reply_topic: str) -> None:
        self.reply_topic = reply_topic
        self.replies: dict[bytes, list[bytes]] = {}
        self._cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fuzz-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        connected, subscribed = threading.Event(), threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.dropped: list[str] = []  # the broker dropped this client (it sent a bad packet)
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self.dropped.append(str(reason))
        self.client.connect(HOST, broker.port, 30)
        self.client.loop_start()
        assert connected.wait(10), "the fuzzing client could not connect"
        self.client.subscribe(reply_topic, 1)
        assert subscribed.wait(10), "no SUBACK for the reply topic"
        self._n = 0

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        corr = getattr(m.properties, "CorrelationData", None) or b""
        with self._cond:
            self.replies.setdefault(corr, []).append(bytes(m.payload))
            self._cond.notify_all()

    def call(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        within: float = REPLY_WITHIN,
    ) -> Any:
        self._n += 1
        corr = f"c{self._n}".encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        self.client.publish(topic, payload, qos, retain, props)
        deadline = time.monotonic() + within
        with self._cond:
            while corr not in self.replies:
                assert not self.dropped, f"the broker dropped the fuzzing client: {self.dropped}"
                left = deadline - time.monotonic()
                assert left > 0, f"no reply within {within} s to {payload[:300]!r} on {topic!r}"
                self._cond.wait(left)
            (reply,) = self.replies[corr]
        return json.loads(reply)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()


def _agent_connections(broker: Broker) -> int:
    """How often the agent connected, from the broker's log."""
    return sum(
        1
        for line in broker.log_text().splitlines()
        if "New client connected" in line and f" as edgesaga-{DEVICE} " in line
    )


def _first_reply(caller: Caller, topic: str) -> Any:
    """The agent's first answer. Its connection shows on the broker before its SUBSCRIBE to the
    command topics is in, and a command published in between never reaches a fresh session: ask
    again (each try with its own correlation data) until it answers, for up to 15 s."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return caller.call(topic, b'{"request_id": "first"}', within=1.0)
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_fuzzed_mqtt_commands_get_documented_replies(broker: Broker, tmp_path: Path) -> None:
    prefix = unique_prefix()
    config = _config(
        tmp_path,
        mqtt={"port": broker.port, "topic_prefix": prefix, "max_payload": MAX_PAYLOAD},
    )
    cmd = f"{prefix}/{DEVICE}/cmd/"
    with agent_process(config, test_hooks=False) as agent:
        agent.wait_ready()
        caller = Caller(broker, f"replies/{prefix}")
        try:
            deadline = time.monotonic() + 10
            while not _agent_connections(broker):
                assert time.monotonic() < deadline, "the agent did not connect to the broker"
                time.sleep(0.05)
            assert _first_reply(caller, cmd + "list")["ok"] is True
            logs = LogWatch(agent)
            seen: Counter[str] = Counter()

            @settings(
                max_examples=MQTT_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(command_input(prefix, _level), st.sampled_from([1] * 8 + [0]), st.booleans())
            def one(item: Input, qos: int, retain: bool) -> None:
                retain = retain and item.how in ("valid", "mutated/utf-8") and qos == 1
                reply = caller.call(cmd + item.name, item.payload, qos=qos, retain=retain)
                code = check_reply(reply, item)
                if retain:  # refused, whatever it says
                    assert code == "invalid_command", reply
                elif item.how == "valid":
                    assert code == "ok", reply
                seen[code] += 1
                seen[item.how] += 1
                assert agent.proc.poll() is None, agent.log_text()[-3000:]
                assert logs.problems() == [], item

            one()
            assert agent.proc.poll() is None
            assert caller.call(cmd + "list", b'{"request_id": "last"}')["ok"] is True
            assert logs.problems() == []
            # Never disconnected: one connection for the whole run.
            assert _agent_connections(broker) == 1
            assert seen["ok"] > 0
        finally:
            caller.close()
