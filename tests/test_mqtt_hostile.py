"""Hostile command payloads over MQTT: every one gets an error reply with a code where a reply
address exists, the link task never dies, and a valid start still works afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent._commands import COMMANDS, ERROR_CODES
from agent._mqtt import MqttLink, MqttSettings, Topics
from agent._store import SQLiteStore
from tests._broker import (
    PAYMENT_DATA,
    Broker,
    probe,
    running_agent,
    start_command,
    unique_prefix,
    until,
)

pytestmark = pytest.mark.timeout(60)

DEVICE = "dev1"
MAX_PAYLOAD = 65536
N_HOSTILE = 1100


@dataclass(frozen=True)
class Hostile:
    category: str
    command: str  # the topic's last level
    payload: bytes
    codes: frozenset[str]  # acceptable error codes
    body: dict[str, Any] | None  # the JSON object sent, when it is one (to add reply_to)


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_json_any = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_not_str = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.none(),
)
_not_dict = st.one_of(
    st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.booleans()
)
_name = st.text(
    alphabet=st.characters(
        min_codepoint=0x21,
        max_codepoint=0x2FFF,
        exclude_characters="/+#",
        exclude_categories=("Cs", "Cc"),
    ),
    min_size=1,
    max_size=30,
)


def _obj(category: str, body: dict[str, Any], codes: set[str], command: str = "start") -> Hostile:
    return Hostile(category, command, json.dumps(body).encode(), frozenset(codes), body)


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    category = draw(
        st.sampled_from(
            [
                "invalid_json",
                "binary",
                "deep",
                "non_object",
                "wrong_types",
                "bad_request_id",
                "unknown_fields",
                "oversize",
                "unknown_type",
                "bad_data",
                "unknown_command",
                "not_found",
                "mismatch",
                "bad_list",
                "bad_reply_to",
            ]
        )
    )
    rid = "RID"  # replaced by a unique id when sent
    match category:
        case "invalid_json":
            text = draw(st.text(min_size=1, max_size=80).map(lambda s: "{" + s))
            data = text.encode("utf-8", "surrogatepass")
            if _is_json(data):
                data = b"{" + data
            return Hostile(category, "start", data, frozenset({"invalid_json"}), None)
        case "binary":
            data = draw(st.binary(max_size=200))
            return Hostile(
                category,
                # status and schedules take an empty body: b"{}" is a valid one for them.
                draw(st.sampled_from(sorted(set(COMMANDS) - {"status", "schedules"}))),
                data,
                frozenset({"invalid_json", "invalid_command"}),
                None,
            )
        case "deep":
            depth = draw(st.integers(2000, 30000))
            return Hostile(
                category, "start", b"[" * depth + b"]" * depth, frozenset({"invalid_json"}), None
            )
        case "non_object":
            value = draw(st.one_of(_json_scalar, st.lists(_json_any, max_size=4)))
            return Hostile(
                category,
                draw(st.sampled_from(sorted(COMMANDS))),
                json.dumps(value).encode(),
                frozenset({"invalid_command"}),
                None,
            )
        case "wrong_types":
            field = draw(st.sampled_from(["workflow_type", "data", "saga", "workflow_id"]))
            body = start_command(rid)
            if field == "workflow_type":
                body[field] = draw(_not_str)
            elif field == "data":
                body[field] = draw(_not_dict)
            elif field == "saga":
                body[field] = draw(
                    st.one_of(
                        st.integers(), st.text(max_size=5), st.lists(st.booleans(), max_size=2)
                    )
                )
            else:
                body[field] = draw(
                    st.one_of(
                        _not_str.filter(lambda v: v is not None),
                        st.just("has space"),
                        st.just("a/b"),
                        st.just("x" * 201),
                    )
                )
            return _obj(category, body, {"invalid_command"})
        case "bad_request_id":
            body = start_command(rid)
            value = draw(st.one_of(st.just(None), st.just(""), st.just("r" * 201), _not_str))
            if value is None:
                del body["request_id"]
            else:
                body["request_id"] = value
            return _obj(category, body, {"invalid_command"})
        case "unknown_fields":
            key = draw(
                st.text(min_size=1, max_size=12).filter(
                    lambda k: (
                        k
                        not in {
                            "request_id",
                            "reply_to",
                            "command",
                            "workflow_type",
                            "data",
                            "workflow_id",
                            "saga",
                        }
                    )
                )
            )
            body = {**start_command(rid), key: draw(_json_any)}
            return _obj(category, body, {"invalid_command"})
        case "oversize":
            size = draw(st.integers(MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD))
            body = start_command(rid)
            body["data"] = {**PAYMENT_DATA, "pad": "x" * size}
            return Hostile(
                category, "start", json.dumps(body).encode(), frozenset({"payload_too_large"}), None
            )
        case "unknown_type":
            body = start_command(
                rid, workflow_type=draw(_name.filter(lambda n: n != "PaymentProcessing"))
            )
            return _obj(category, body, {"unknown_workflow_type"})
        case "bad_data":
            data = dict(PAYMENT_DATA)
            how = draw(st.sampled_from(["missing", "amount", "order_id"]))
            if how == "missing":
                del data[draw(st.sampled_from(sorted(PAYMENT_DATA)))]
            elif how == "amount":
                data["amount"] = draw(
                    st.one_of(
                        st.text(alphabet="abc", min_size=1, max_size=5),
                        st.lists(st.integers(), max_size=2),
                        st.none(),
                    )
                )
            else:
                data["order_id"] = draw(
                    st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))
                )
            return _obj(category, start_command(rid, data=data), {"invalid_data"})
        case "unknown_command":
            name = draw(_name.filter(lambda n: n not in COMMANDS))
            return _obj(
                category,
                {
                    "request_id": rid,
                    **draw(st.dictionaries(st.text(max_size=5), _json_scalar, max_size=3)),
                },
                {"unknown_command"},
                command=name,
            )
        case "not_found":
            command = draw(st.sampled_from(["get", "cancel", "retry", "resume"]))
            wid = draw(st.text(alphabet="abcdef0123456789-", min_size=1, max_size=36))
            return _obj(
                category,
                {"request_id": rid, "workflow_id": f"nope-{wid}"},
                {"not_found"},
                command=command,
            )
        case "mismatch":
            other = draw(st.sampled_from(["cancel", "get", "list", "retry"]))
            return _obj(category, {**start_command(rid), "command": other}, {"invalid_command"})
        case "bad_list":
            body: dict[str, Any] = {"request_id": rid}
            how = draw(st.sampled_from(["limit", "status"]))
            if how == "limit":
                body["limit"] = draw(
                    st.one_of(
                        st.integers(max_value=0), st.integers(min_value=1001), st.text(max_size=3)
                    )
                )
            else:
                body["status"] = [
                    draw(
                        st.text(max_size=10).filter(
                            lambda s: (
                                s
                                not in {
                                    "ACTIVE",
                                    "PAUSED",
                                    "COMPLETED",
                                    "FAILED",
                                    "COMPENSATING",
                                    "FAILED_ROLLED_BACK",
                                    "COMPENSATION_FAILED",
                                    "CANCELLED",
                                }
                            )
                        )
                    )
                ]
            return _obj(category, body, {"invalid_command"}, command="list")
        case _:  # bad_reply_to: an invalid command whose reply_to is not a topic one can publish to
            body = {**start_command(rid), "saga": "no"}
            return Hostile(category, "start", b"", frozenset({"invalid_command"}), body)


def generate(n: int) -> list[Hostile]:
    out: list[Hostile] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile())
    def collect(item: Hostile) -> None:
        out.append(item)

    collect()
    return out


def prepare(i: int, item: Hostile, reply_topic: str | None) -> bytes:
    """The payload with a unique request id (and reply_to) where the category keeps one."""
    if item.body is None:
        return item.payload
    body = dict(item.body)
    if body.get("request_id") == "RID":
        body["request_id"] = f"h{i}"
    if item.category == "bad_reply_to":
        body["reply_to"] = f"bad/+/{i}"
    elif reply_topic is not None:
        body["reply_to"] = reply_topic
    return json.dumps(body).encode()


async def test_hostile_payloads_get_error_replies_and_never_kill_the_link(
    broker: Broker, tmp_path: Path
) -> None:
    items = generate(N_HOSTILE)
    assert len(items) >= 1000
    assert {i.category for i in items} >= {
        "invalid_json",
        "binary",
        "oversize",
        "unknown_type",
        "bad_data",
        "unknown_command",
    }
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    v5_replies, rt_replies = f"replies/{prefix}/v5", f"replies/{prefix}/rt"
    settings_ = broker.settings(prefix, max_payload=MAX_PAYLOAD)
    async with (
        running_agent(tmp_path / "db", settings_, device=DEVICE) as agent,
        probe(broker, v5_replies, rt_replies) as attacker,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        link_task = agent.link_task
        expect_v5: dict[bytes, Hostile] = {}
        expect_rt: dict[str, Hostile] = {}
        rt_anonymous = 0  # addressable by reply_to, but without a usable request_id
        silent = 0
        infos = []
        for i, item in enumerate(items):
            if i % 2 == 0:  # MQTT 5 response topic + correlation data
                payload = prepare(i, item, None)
                expect_v5[str(i).encode()] = item
                infos.append(
                    attacker.publish(
                        t.command_base + item.command,
                        payload,
                        response_topic=v5_replies,
                        correlation=str(i).encode(),
                    )
                )
            else:  # the command's own reply_to, where the payload can carry one
                addressable = item.body is not None and item.category not in (
                    "oversize",
                    "bad_reply_to",
                )
                payload = prepare(i, item, rt_replies if addressable else None)
                if addressable and item.body is not None and item.body.get("request_id") == "RID":
                    expect_rt[f"h{i}"] = item
                elif addressable:
                    rt_anonymous += 1
                else:
                    silent += 1
                infos.append(attacker.publish(t.command_base + item.command, payload))
        assert silent > 0
        assert rt_anonymous > 0

        def all_in(ms: list) -> bool:
            return (
                len([m for m in ms if m.topic == v5_replies]) >= len(expect_v5)
                and len([m for m in ms if m.topic == rt_replies]) >= len(expect_rt) + rt_anonymous
            )

        started = time.monotonic()
        await attacker.wait_for(all_in, within=40)
        elapsed = time.monotonic() - started

        v5 = attacker.on(v5_replies)
        assert sorted(m.correlation for m in v5) == sorted(expect_v5)  # exactly one reply each
        for m in v5:
            item = expect_v5[m.correlation]
            body = m.json()
            assert body["ok"] is False, (item, body)
            assert body["error"]["code"] in ERROR_CODES
            assert body["error"]["code"] in item.codes, (item.category, item.payload[:200], body)
            assert isinstance(body["error"]["message"], str)
            assert body["error"]["message"]
        rt = [m.json() for m in attacker.on(rt_replies)]
        assert len(rt) == len(expect_rt) + rt_anonymous
        matched = [b for b in rt if b["request_id"] in expect_rt]
        assert sorted(b["request_id"] for b in matched) == sorted(expect_rt)
        for body in rt:
            assert body["ok"] is False
            item = expect_rt.get(body["request_id"])
            codes = item.codes if item is not None else {"invalid_command"}  # a bad request_id
            assert body["error"]["code"] in codes, (item, body)

        # The same task is still running, nothing was started, and a valid start works.
        assert agent.link_task is link_task
        assert not link_task.done()
        assert not agent.runner_task.done()
        assert await agent.store.list_instances() == []
        attacker.publish(
            t.command_base + "start",
            start_command("after-the-storm"),
            response_topic=v5_replies,
            correlation=b"ok",
        )
        await attacker.wait_for(lambda ms: any(m.correlation == b"ok" for m in ms), within=10)
        reply = next(m for m in attacker.on(v5_replies) if m.correlation == b"ok").json()
        assert reply["ok"] is True
        await agent.wait_finished(1)
        (record,) = await agent.store.list_instances()
        assert record.status.value == "COMPLETED"
        assert elapsed < 40


async def test_a_failing_handler_gets_an_internal_error_reply(
    broker: Broker, tmp_path: Path
) -> None:
    calls = 0

    async def handler(name: str, payload: bytes) -> tuple[dict[str, Any], str | None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return {"request_id": "r2", "ok": True}, None

    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}"
    async with SQLiteStore(tmp_path / "db") as store, probe(broker, replies) as caller:
        link = MqttLink(
            settings=broker.settings(prefix), device_id=DEVICE, store=store, handler=handler
        )
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(link.run())
            await asyncio.wait_for(link.connected_event.wait(), 10)
            caller.publish(t.command_base + "get", b"{}", response_topic=replies, correlation=b"1")
            caller.publish(t.command_base + "get", b"{}", response_topic=replies, correlation=b"2")
            await caller.wait_for(lambda ms: len(ms) == 2)
            by_corr = {m.correlation: m.json() for m in caller.messages}
            assert by_corr[b"1"]["error"]["code"] == "internal_error"
            assert by_corr[b"2"] == {"request_id": "r2", "ok": True}
            assert not task.done()
            task.cancel()


async def test_a_flood_is_served_with_bounded_concurrency(broker: Broker, tmp_path: Path) -> None:
    """At most max_concurrent_commands run at once, and (MQTT 5 Receive Maximum with manual
    acknowledgements) the broker holds the rest: the agent never buffers more than that."""
    release = asyncio.Event()
    running = peak = served = 0

    async def handler(name: str, payload: bytes) -> tuple[dict[str, Any], str | None]:
        nonlocal running, peak, served
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
        served += 1
        return {"request_id": payload.decode(), "ok": True}, None

    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}"
    n = 300
    async with SQLiteStore(tmp_path / "db") as store, probe(broker, replies) as flooder:
        link = MqttLink(
            settings=broker.settings(prefix),
            device_id=DEVICE,
            store=store,
            handler=handler,
            max_concurrent_commands=4,
        )
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(link.run())
            await asyncio.wait_for(link.connected_event.wait(), 10)
            for i in range(n):
                flooder.publish(
                    t.command_base + "get",
                    str(i).encode(),
                    response_topic=replies,
                    correlation=str(i).encode(),
                )
            await until(lambda: running >= 4, within=10)
            await asyncio.sleep(0.5)
            assert running == 4
            assert peak == 4
            assert link._incoming.qsize() <= 2 * 4  # the broker keeps the rest (Receive Maximum)
            release.set()
            await flooder.wait_for(lambda ms: len(ms) == n, within=20)
            assert served == n
            assert sorted(int(m.correlation) for m in flooder.messages) == list(range(n))
            assert not task.done()
            task.cancel()


# ------------------------------------------------------------------------------------------------
# Reply addresses: a reply must not pass for the agents' own messages (issue 10, #11)


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "edgesaga.mqtt" and r.getMessage().startswith("refused")
    ]


async def test_reply_addresses_under_the_topic_prefix_are_refused(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller who may only publish to ``cmd/`` cannot make the agent publish, with its own
    credentials, on its events, availability, alerts or state topics, or on another device's
    commands: such a command is not carried out, and its error reply goes only to a response
    topic outside the prefix."""
    caplog.set_level(logging.INFO, logger="edgesaga.mqtt")
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    errors = f"replies/{prefix}/errors"  # outside the prefix: allowed
    targets = [
        t.events,
        t.availability,
        t.alerts,
        t.state("w1"),
        f"{prefix}/dev2/cmd/start",
        t.command_base + "list",
        f"{prefix}/dev1/replies/me",
        f"{prefix}/other",
    ]
    async with (
        running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent,
        probe(broker, f"{prefix}/#", errors) as attacker,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        sent = 0
        for i, target in enumerate(targets):
            # MQTT 3.1.1 style: reply_to only; nowhere to send the error.
            attacker.publish(t.command_base + "start", start_command(f"a{i}", reply_to=target))
            # reply_to under the prefix, with a usable response topic: the error goes there.
            attacker.publish(
                t.command_base + "start",
                start_command(f"b{i}", reply_to=target),
                response_topic=errors,
                correlation=f"b{i}".encode(),
            )
            # The MQTT 5 response topic itself under the prefix.
            attacker.publish(
                t.command_base + "start",
                start_command(f"c{i}"),
                response_topic=target,
                correlation=f"c{i}".encode(),
            )
            sent += 3
        await attacker.wait_for(
            lambda ms: len([m for m in ms if m.topic == errors]) == len(targets)
        )
        await until(lambda: len(_refusals(caplog)) >= 3 * len(targets), within=10)

        for m in attacker.on(errors):
            body = m.json()
            assert m.correlation == body["request_id"].encode()
            assert body["ok"] is False
            assert body["error"]["code"] == "invalid_command"
            assert "reply_to" in body["error"]["message"]
            assert (
                "mqtt.reply_to_allow" in body["error"]["message"]
                or "own" in (body["error"]["message"])
            )
        assert sorted(m.correlation for m in attacker.on(errors)) == sorted(
            f"b{i}".encode() for i in range(len(targets))
        )
        # Under the prefix: only what the attacker sent and the agent's `online`.
        under = [m for m in attacker.messages if m.topic.startswith(prefix + "/")]
        assert [m for m in under if m.topic == t.availability] == [
            m for m in under if m.topic == t.availability and m.payload == b"online"
        ]
        assert len([m for m in under if m.topic == t.command_base + "start"]) == sent
        assert {m.topic for m in under} == {t.availability, t.command_base + "start"}
        assert await agent.store.list_instances() == []  # nothing was carried out
        assert agent.link.connects == 1
        assert not agent.link_task.done()


async def test_the_allow_list_opens_topics_under_the_prefix_but_never_the_protocols_own(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    mine = f"{prefix}/{DEVICE}/replies/me"
    errors = f"replies/{prefix}/errors"
    settings_ = broker.settings(prefix, reply_to_allow=[f"{prefix}/+/replies/#", f"{prefix}/#"])
    async with (
        running_agent(tmp_path / "db", settings_, device=DEVICE) as agent,
        probe(broker, mine, t.events, errors) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        caller.publish(t.command_base + "list", {"request_id": "l1", "reply_to": mine})
        caller.publish(
            t.command_base + "list",
            {"request_id": "l2", "reply_to": t.events},
            response_topic=errors,
            correlation=b"l2",
        )
        await caller.wait_for(lambda ms: bool(caller.on(mine)) and bool(caller.on(errors)))
        assert caller.on(mine)[0].json() == {
            "request_id": "l1",
            "ok": True,
            "workflows": [],
            "next_cursor": None,
        }
        refused = caller.on(errors)[0].json()
        assert refused["request_id"] == "l2"
        assert refused["error"]["code"] == "invalid_command"
        assert caller.on(t.events) == []


@pytest.mark.parametrize(
    "reply_to",
    [
        "",
        "a/+/b",
        "a/#",
        "x" * 501,
        "a\u0001b",
        "a\x7fb",
        "a\u0085b",
        "\ud800",
        "a\ufffeb",
        "a\ufdd0b",
        "a\U0010ffff",
        "$SYS/x",
    ],
    ids=[
        "empty",
        "plus",
        "hash",
        "long",
        "c0",
        "del",
        "c1",
        "surrogate",
        "nonchar-fffe",
        "nonchar-fdd0",
        "nonchar-10ffff",
        "dollar",
    ],
)
async def test_a_reply_to_no_one_can_publish_to_is_refused(
    broker: Broker, tmp_path: Path, reply_to: str
) -> None:
    """Wildcards, control characters, lone surrogates, Unicode noncharacters, '$' topics, empty or
    oversize: the command is not carried out, the error reply goes to the response topic, and the
    connection stays up (Mosquitto drops a client that publishes to a topic with a control
    character or a noncharacter; the command, not acknowledged, would come back for ever)."""
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    errors = f"replies/{prefix}/errors"
    async with (
        running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent,
        probe(broker, errors) as caller,
    ):
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)
        caller.publish(
            t.command_base + "start",
            json.dumps(start_command("bad-rt", reply_to=reply_to)),
            response_topic=errors,
            correlation=b"1",
        )
        await caller.wait_for(lambda ms: len(ms) == 1)
        body = caller.messages[0].json()
        assert body["request_id"] == "bad-rt"
        assert body["error"]["code"] == "invalid_command"
        assert "reply_to" in body["error"]["message"]
        assert await agent.store.list_instances() == []
        # Still connected on the first connection, and serving.
        caller.publish(t.command_base + "list", {"request_id": "l"}, response_topic=errors)
        await caller.wait_for(lambda ms: len(ms) == 2)
        assert caller.messages[1].json()["ok"] is True
        assert agent.link.connects == 1


# ------------------------------------------------------------------------------------------------
# Retained commands are refused, replayed or live (issue 10, #20)


async def test_a_retained_command_is_refused_when_published_live_mqtt5(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgesaga.mqtt")
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}"
    async with probe(broker, replies) as caller:
        # Retained before the agent subscribes: never sent to it (MQTT 5 retain handling).
        early = caller.publish(
            t.command_base + "start",
            start_command("early"),
            retain=True,
            response_topic=replies,
            correlation=b"early",
        )
        early.wait_for_publish(5)
        async with running_agent(tmp_path / "db", broker.settings(prefix), device=DEVICE) as agent:
            await asyncio.wait_for(agent.link.connected_event.wait(), 10)
            # Published live with the retain flag: refused with an error reply.
            caller.publish(
                t.command_base + "start",
                start_command("live"),
                retain=True,
                response_topic=replies,
                correlation=b"live",
            )
            await caller.wait_for(lambda ms: len(ms) == 1)
            (refused,) = caller.messages
            assert refused.correlation == b"live"
            body = refused.json()
            assert body["request_id"] == "live"
            assert body["ok"] is False
            assert body["error"]["code"] == "invalid_command"
            assert "retain" in body["error"]["message"]
            assert any("retain" in line for line in _refusals(caplog))
            assert await agent.store.list_instances() == []
            # Without the flag the same command is carried out.
            caller.publish(
                t.command_base + "start",
                start_command("live"),
                response_topic=replies,
                correlation=b"plain",
            )
            await caller.wait_for(lambda ms: len(ms) == 2)
            assert caller.messages[1].json()["ok"] is True
            await agent.wait_finished(1)
            assert [r.id for r in await agent.store.list_instances()] == [
                caller.messages[1].json()["workflow_id"]
            ]


async def test_a_retained_command_queued_while_the_agent_was_away_is_refused_mqtt5(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}"
    settings_ = broker.settings(prefix)
    async with running_agent(tmp_path / "db", settings_, device=DEVICE) as agent:
        await asyncio.wait_for(agent.link.connected_event.wait(), 10)  # the session exists
    async with probe(broker, replies) as caller:
        caller.publish(
            t.command_base + "start",
            start_command("queued"),
            retain=True,
            response_topic=replies,
            correlation=b"q",
        ).wait_for_publish(5)
        async with running_agent(tmp_path / "db", settings_, device=DEVICE) as agent:
            await caller.wait_for(lambda ms: len(ms) == 1)
            body = caller.messages[0].json()
            assert body["request_id"] == "queued"
            assert body["error"]["code"] == "invalid_command"
            assert await agent.store.list_instances() == []


async def test_a_retained_command_replayed_on_subscribe_is_ignored_mqtt311(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgesaga.mqtt")
    prefix = unique_prefix()
    t = Topics(prefix, DEVICE)
    replies = f"replies/{prefix}"
    async with probe(broker, replies, version="3.1.1") as caller:
        early = caller.publish(
            t.command_base + "start", start_command("early", reply_to=replies), retain=True
        )
        early.wait_for_publish(5)
        settings_ = broker.settings(prefix, version="3.1.1")
        async with running_agent(tmp_path / "db", settings_, device=DEVICE) as agent:
            await asyncio.wait_for(agent.link.connected_event.wait(), 10)
            await until(lambda: any("retain" in line for line in _refusals(caplog)), within=10)
            caller.publish(t.command_base + "list", {"request_id": "l", "reply_to": replies})
            await caller.wait_for(lambda ms: len(ms) == 1)
            assert caller.messages[0].json() == {
                "request_id": "l",
                "ok": True,
                "workflows": [],
                "next_cursor": None,
            }
            assert await agent.store.list_instances() == []


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "a\x00b"])
def test_reply_to_allow_takes_only_topic_filters(bad: str) -> None:
    with pytest.raises(ValidationError, match="is not a topic filter"):
        MqttSettings(reply_to_allow=[bad])
    assert MqttSettings(reply_to_allow=["a/+/b/#", "#"]).reply_to_allow == ["a/+/b/#", "#"]
