"""Home Assistant MQTT discovery (DESIGN §12) against a real Mosquitto and a real ``edgesaga run``
subprocess, with a paho client standing in for Home Assistant."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent._config import ConfigError, load_config
from tests._broker import Broker, unique_prefix
from tests.flows.service.harness import (
    SERVICE_DEFS,
    AgentProcess,
    agent_process,
    poll,
    retained,
    write_config,
)

DEVICE = "svc-test"
HA_FLOWS = {
    "ha_pause.yaml": """
workflow_type: HaPause
workflow_version: "1.0.0"
initial_state_model: ha_test_models.HaState
description: "A step, then a person's approval, then a step"
steps:
  - {name: First, function: tests.flows.service.steps.quick, automate_next: true}
  - {name: Approve, type: HUMAN_INPUT, input_model: tests.flows.crashflow.models.Approval}
  - {name: Last, function: tests.flows.service.steps.quick}
""",
    "ha_lamp.yaml": """
workflow_type: HaLamp
workflow_version: "1.0.0"
initial_state_model: tests.flows.service.steps.ServiceState
description: "Holds the lamp on for a long step"
resources: [lamp]
steps:
  - {name: Lamp_On, function: tests.flows.service.steps.lamp_on, params: {device: lamp},
     automate_next: true}
  - {name: Hold, function: tests.flows.service.steps.sleep_long}
""",
}
HA_MODELS = """
from tests.flows.service.steps import ServiceState


class HaState(ServiceState):
    approved: bool = False
    note: str = ""
"""
#: What Home Assistant requires besides unique_id, device and availability, per component.
REQUIRED = {
    "button": ("command_topic",),
    "sensor": ("state_topic",),
    "binary_sensor": ("state_topic",),
    "switch": ("command_topic", "state_topic"),
}


class HomeAssistantClient:
    """A paho client standing in for Home Assistant: keeps the last message of every topic."""

    def __init__(self, port: int, *filters: str) -> None:
        self.messages: dict[str, bytes] = {}
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ha-{uuid.uuid4().hex}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert ready.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages[m.topic] = bytes(m.payload)
            self.counts[m.topic] = self.counts.get(m.topic, 0) + 1

    def get(self, topic: str) -> bytes | None:
        with self._lock:
            return self.messages.get(topic)

    def configs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            items = list(self.messages.items())
        return {t: json.loads(p) for t, p in items if t.endswith("/config") and p}

    def json(self, topic: str) -> dict[str, Any] | None:
        raw = self.get(topic)
        return json.loads(raw) if raw else None

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ha_clients() -> Iterator[list[HomeAssistantClient]]:
    made: list[HomeAssistantClient] = []
    yield made
    for c in made:
        c.close()


def _config(tmp_path: Path, broker: Broker, prefix: str, expose: list[str], **ha: Any) -> Path:
    flows = tmp_path / "ha_flows"
    flows.mkdir(exist_ok=True)
    for name, text in HA_FLOWS.items():
        (flows / name).write_text(text)
    (flows / "ha_test_models.py").write_text(HA_MODELS)
    return write_config(
        tmp_path,
        mqtt={"port": broker.port, "topic_prefix": prefix, "reconnect_max": 1.0},
        definitions=[str(SERVICE_DEFS), str(flows)],
        homeassistant={
            "enabled": True,
            "discovery_prefix": f"{prefix}-ha",
            "expose": expose,
            **ha,
        },
    )


def _ready(agent: AgentProcess) -> None:
    agent.wait_ready()
    poll(
        lambda: agent.request("status"),
        lambda s: s["mqtt_connected"] is True,
        what="the agent to connect to the broker",
    )


def _wait_configs(ha: HomeAssistantClient, at_least: int) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = poll(
        ha.configs, lambda c: len(c) >= at_least, within=15, what="the discovery configs"
    )
    return result


def _entity(configs: dict[str, dict[str, Any]], component: str, suffix: str) -> dict[str, Any]:
    found = [c for t, c in configs.items() if t.split("/")[-4] == component and t.endswith(suffix)]
    assert len(found) == 1, (component, suffix, sorted(configs))
    return found[0]


# 3 HA types: HaPause start+approve+reject+sensor = 4, ServiceQuick 2, HaLamp 2; door, lamp; 4 stats
EXPOSE = ["ServiceQuick", "HaPause", "HaLamp"]
ALL_CONFIGS = 4 + 2 + 2 + 2 + 4


async def test_every_config_has_the_required_keys_and_press_starts_a_workflow_to_completed(
    tmp_path: Path, broker: Broker, ha_clients: list[HomeAssistantClient]
) -> None:
    prefix = unique_prefix()
    config = _config(
        tmp_path, broker, prefix, EXPOSE, start_data={"ServiceQuick": {"seconds": 3.5}}
    )
    ha = HomeAssistantClient(broker.port, f"{prefix}-ha/#", f"{prefix}/{DEVICE}/ha/#")
    ha_clients.append(ha)
    with agent_process(config) as agent:
        await asyncio.to_thread(_ready, agent)
        configs = await asyncio.to_thread(_wait_configs, ha, ALL_CONFIGS)
        assert len(configs) == ALL_CONFIGS, sorted(configs)
        components = sorted(t.split("/")[-4] for t in configs)
        assert components.count("button") == 5
        assert components.count("switch") == 1
        assert components.count("binary_sensor") == 1
        assert components.count("sensor") == 7
        unique = {c["unique_id"] for c in configs.values()}
        assert len(unique) == len(configs)
        for topic, c in configs.items():
            component = topic.split("/")[-4]
            for key in REQUIRED[component]:
                assert c.get(key), (topic, key, c)
            assert c["availability_topic"] == f"{prefix}/{DEVICE}/availability", topic
            device = c["device"]
            assert all(device.get(k) for k in ("identifiers", "name", "model", "sw_version")), c
        retained_now = await asyncio.to_thread(retained, broker.port, f"{prefix}-ha/#")
        assert set(retained_now) == set(configs)  # every config is retained

        button = _entity(configs, "button", "ServiceQuick_start/config")
        sensor = _entity(configs, "sensor", "ServiceQuick_status/config")
        assert sensor["json_attributes_topic"] == sensor["state_topic"]
        assert json.loads(ha.get(sensor["state_topic"]) or b"{}").get("status") == "none"
        await asyncio.to_thread(ha.publish, button["command_topic"], "PRESS")
        state = await asyncio.to_thread(
            poll,
            lambda: ha.json(sensor["state_topic"]) or {},
            lambda s: s.get("status") == "COMPLETED",
            within=15,
            what="the sensor to follow the instance to COMPLETED",
        )
        assert state["workflow_type"] == "ServiceQuick"
        assert state["created_at"]
        info = agent.get(state["workflow_id"])
        assert info["status"] == "COMPLETED"
        assert info["state"]["seconds"] == 3.5  # the start_data
        assert info["state"]["done"] == ["Step_One", "Step_Two"]

        # The agent sensors: one finished workflow, nothing active.
        stats_topic = _entity(configs, "sensor", "agent_active/config")["state_topic"]
        stats = await asyncio.to_thread(
            poll, lambda: ha.json(stats_topic) or {}, lambda s: "outbox" in s, what="stats"
        )
        assert stats["active"] == 0
        assert stats["failed_24h"] == 0

        # Home Assistant's birth message brings every config again.
        before = dict(ha.counts)
        await asyncio.to_thread(ha.publish, f"{prefix}-ha/status", "online")
        await asyncio.to_thread(
            poll,
            lambda: dict(ha.counts),
            lambda now: all(now.get(t, 0) > before.get(t, 0) for t in configs),
            within=15,
            what="discovery to be re-sent after the birth message",
        )
    assert "Traceback" not in agent.log_text()


async def test_approve_resumes_the_oldest_paused_instance_and_reject_cancels_one(
    tmp_path: Path, broker: Broker, ha_clients: list[HomeAssistantClient]
) -> None:
    prefix = unique_prefix()
    config = _config(tmp_path, broker, prefix, EXPOSE)
    ha = HomeAssistantClient(broker.port, f"{prefix}-ha/#")
    ha_clients.append(ha)
    with agent_process(config) as agent:
        await asyncio.to_thread(_ready, agent)
        configs = await asyncio.to_thread(_wait_configs, ha, ALL_CONFIGS)
        approve = _entity(configs, "button", "HaPause_approve/config")["command_topic"]
        reject = _entity(configs, "button", "HaPause_reject/config")["command_topic"]
        assert not any("ServiceQuick_approve" in t for t in configs)  # no HUMAN_INPUT step
        # Bounded like any command: an oversize press is refused and starts nothing.
        start = _entity(configs, "button", "HaPause_start/config")["command_topic"]
        await asyncio.to_thread(ha.publish, start, "PRESS" + " " * 70_000)
        await asyncio.to_thread(
            poll,
            agent.log_text,
            lambda text: "refused a Home Assistant message" in text,
            what="the refusal of the oversize press",
        )
        assert agent.request("list")["workflows"] == []
        first = agent.start("HaPause")
        await asyncio.to_thread(agent.wait_status, first, "PAUSED")
        second = agent.start("HaPause")
        await asyncio.to_thread(agent.wait_status, second, "PAUSED")

        await asyncio.to_thread(ha.publish, approve, "PRESS")
        done = await asyncio.to_thread(agent.wait_status, first, "COMPLETED")
        assert done["state"]["done"] == ["First", "Last"]
        assert agent.get(second)["status"] == "PAUSED"  # the oldest one was approved

        await asyncio.to_thread(ha.publish, reject, "PRESS")
        await asyncio.to_thread(agent.wait_status, second, "CANCELLED")
        assert "Last" not in agent.get(second)["state"]["done"]


async def test_an_output_switch_is_refused_while_a_workflow_holds_the_output(
    tmp_path: Path, broker: Broker, ha_clients: list[HomeAssistantClient]
) -> None:
    prefix = unique_prefix()
    config = _config(tmp_path, broker, prefix, EXPOSE)
    ha = HomeAssistantClient(broker.port, f"{prefix}-ha/#", f"{prefix}/{DEVICE}/ha/#")
    ha_clients.append(ha)
    with agent_process(config) as agent:
        await asyncio.to_thread(_ready, agent)
        configs = await asyncio.to_thread(_wait_configs, ha, ALL_CONFIGS)
        switch = _entity(configs, "switch", "dev_lamp/config")
        state = switch["state_topic"]
        assert await asyncio.to_thread(poll, lambda: ha.get(state), lambda v: v == b"OFF")

        wid = agent.start("HaLamp", {"seconds": 30})
        await asyncio.to_thread(
            poll,
            lambda: agent.get(wid),
            lambda info: info["current_step"] == "Hold",
            what="the workflow to hold the lamp on",
        )
        await asyncio.to_thread(poll, lambda: ha.get(state), lambda v: v == b"ON")
        await asyncio.to_thread(ha.publish, switch["command_topic"], "OFF")
        await asyncio.to_thread(
            poll,
            agent.log_text,
            lambda text: "refused to switch lamp OFF" in text,
            what="the refusal in the log",
        )
        assert agent.request("pins")["pins"]["lamp"] is True
        assert ha.get(state) == b"ON"  # the real value

        agent.request("cancel", workflow_id=wid)
        await asyncio.to_thread(agent.wait_status, wid, "CANCELLED", "FAILED_ROLLED_BACK")
        await asyncio.to_thread(poll, lambda: ha.get(state), lambda v: v == b"OFF")
        await asyncio.to_thread(ha.publish, switch["command_topic"], "ON")  # nobody holds it
        await asyncio.to_thread(
            poll, lambda: agent.request("pins")["pins"]["lamp"], lambda v: v is True
        )
        await asyncio.to_thread(poll, lambda: ha.get(state), lambda v: v == b"ON")


async def test_a_type_removed_from_the_config_has_its_configs_emptied_on_the_next_start(
    tmp_path: Path, broker: Broker
) -> None:
    prefix = unique_prefix()
    config = _config(tmp_path, broker, prefix, EXPOSE)
    with agent_process(config) as agent:
        await asyncio.to_thread(_ready, agent)
        first = await asyncio.to_thread(
            poll,
            lambda: retained(broker.port, f"{prefix}-ha/#"),
            lambda r: len(r) == ALL_CONFIGS,
            within=15,
            what="the first discovery",
        )
        agent.terminate()
        assert await asyncio.to_thread(agent.wait_exit) == 0
    pause_topics = {t for t in first if "HaPause" in t}
    assert len(pause_topics) == 4

    config = _config(tmp_path, broker, prefix, ["ServiceQuick", "HaLamp"])
    with agent_process(config, log_name="agent2.log") as agent:
        await asyncio.to_thread(_ready, agent)
        after = await asyncio.to_thread(
            poll,
            lambda: retained(broker.port, f"{prefix}-ha/#"),
            lambda r: not (set(r) & pause_topics),
            within=15,
            what="the removed type's configs to be emptied",
        )
    assert set(after) == set(first) - pause_topics


def test_exposing_a_type_that_is_not_loaded_is_refused_in_one_sentence(
    tmp_path: Path, broker: Broker
) -> None:
    from agent._homeassistant import HomeAssistantConfigError, check_exposed

    config = load_config(_config(tmp_path, broker, "p", ["ServiceQuick", "Nope"]))
    with pytest.raises(HomeAssistantConfigError, match=r"expose names Nope, which is not"):
        check_exposed(config.homeassistant, ["ServiceQuick"])
    bad = _config(tmp_path, broker, "p", ["ServiceQuick"], start_data={"Other": {}})
    with pytest.raises(ConfigError, match="start_data names Other"):
        load_config(bad)
