"""A PAUSED workflow through the operator's paths: it survives an agent restart (SIGKILL and SIGTERM),
``list`` and ``show`` say what it waits for, invalid input is refused naming the field and leaves it
PAUSED, and valid input resumes it to COMPLETED: by ``edgesaga resume`` (with a running agent and
without one) and by ``mosquitto_pub`` on ``cmd/resume``.

Real parts: an ``edgesaga run`` subprocess, the ``edgesaga`` command, Mosquitto and its
``mosquitto_pub`` client, SQLite files in the test's directory. The workflow is the bundled
PaymentWithApproval (it pauses at Approve_Refund for a refund approval).
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests._broker import HOST, Broker, unique_prefix
from tests.flows.service.harness import agent_process, cli, journal, poll, write_config

pytestmark = pytest.mark.timeout(120)

DEVICE = "resume-dev"
ORDER = {"order_id": "ORD-5", "customer_id": "CUST-5", "amount": 42.0}
BEFORE_PAUSE = [
    ("Create_Order", "forward", 1, "completed"),
    ("Charge_Payment", "forward", 1, "completed"),
]
WHOLE = [
    *BEFORE_PAUSE,
    ("Reserve_Inventory", "forward", 1, "completed"),
    ("Create_Shipment", "forward", 1, "completed"),
]
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


def config(directory: Path, **mqtt: Any) -> Path:
    return write_config(
        directory,
        device_id=DEVICE,
        definitions=[],
        include_bundled=True,
        mqtt=mqtt or None,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The CLI's refusal: exit status 2, one line on stderr; its sentence and code."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    found = re.fullmatch(r"edgesaga: error: (.*) \(([a-z_]+)\)", lines[0])
    assert found is not None, lines[0]
    return found[1], found[2]


def assert_waits_for_approval(cfg: Path, wid: str) -> None:
    """``list --status PAUSED`` and ``show`` say which step waits for which input."""
    listed = cli(cfg, "list", "--status", "PAUSED")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(wid))
    assert "PAUSED" in lines[row]
    assert "Approve_Refund" in lines[row]
    assert lines[row + 1].strip() == "waiting for input: refund_approved, approved_by"
    shown = cli(cfg, "show", wid)
    assert shown.returncode == 0, shown.stderr
    assert "waiting     for input at step Approve_Refund:" in shown.stdout
    assert "refund_approved (boolean, default true)" in shown.stdout
    assert "a press of approve_button approves it with the defaults" in shown.stdout
    as_json = json.loads(cli(cfg, "show", wid, "--json").stdout)
    waiting = as_json["waiting_input"]
    assert waiting["step"] == "Approve_Refund"
    assert waiting["approve_with"] == "approve_button"
    assert waiting["schema"]["properties"]["refund_approved"]["type"] == "boolean"
    assert set(waiting["schema"]["properties"]) == {"refund_approved", "approved_by"}


def test_resume_by_the_cli_after_a_sigkill(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with agent_process(cfg, log_name="first.log") as agent:
        agent.wait_ready()
        wid = agent.start("PaymentWithApproval", ORDER, workflow_id="order-cli")
        agent.wait_status(wid, "PAUSED")
        agent.proc.kill()
        agent.proc.wait(timeout=10)
    with agent_process(cfg, log_name="second.log") as agent:
        agent.wait_ready()
        info = agent.get(wid)
        assert (info["status"], info["current_step"]) == ("PAUSED", "Approve_Refund")
        assert journal(agent.database, wid) == BEFORE_PAUSE  # recovery ran nothing
        assert_waits_for_approval(cfg, wid)

        bad = cli(cfg, "resume", wid, "--data", '{"refund_approved": "maybe"}')
        sentence, code = one_error_line(bad)
        assert code == "invalid_input"
        assert sentence.startswith("the agent refused: ")
        assert "refund_approved" in sentence
        assert agent.get(wid)["status"] == "PAUSED"
        assert journal(agent.database, wid) == BEFORE_PAUSE

        good = cli(cfg, "resume", wid, "--data", '{"refund_approved": true, "approved_by": "cli"}')
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["ok"] is True
        done = agent.wait_status(wid, "COMPLETED", within=20)
        assert done["state"]["approved_by"] == "cli"
        assert journal(agent.database, wid) == WHOLE


def test_resume_by_the_cli_without_an_agent(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with agent_process(cfg) as agent:
        agent.wait_ready()
        wid = agent.start("PaymentWithApproval", ORDER, workflow_id="order-here")
        agent.wait_status(wid, "PAUSED")
        agent.terminate()
        assert agent.wait_exit() == 0
    # no agent: the CLI carries the command out itself, with the agent's own handler
    bad = cli(cfg, "resume", wid, "--data", '{"approved_by": 7}')
    sentence, code = one_error_line(bad)
    assert code == "invalid_input"
    assert "approved_by" in sentence
    assert not sentence.startswith("the agent refused")
    assert json.loads(cli(cfg, "get", wid).stdout)["status"] == "PAUSED"
    good = cli(cfg, "resume", wid, "--data", '{"refund_approved": true}')
    assert good.returncode == 0, good.stderr
    # the steps print as they run (the tutorial's steps do); the final snapshot comes last
    snapshot = json.loads(good.stdout[good.stdout.rindex("\n{\n") :])
    assert (snapshot["workflow_id"], snapshot["status"]) == (wid, "COMPLETED")
    database = Path(tmp_path / "state" / "edgesaga.db")
    assert journal(database, wid) == WHOLE


class Replies:
    """A paho subscriber on the reply topic (subscribed before anything is published)."""

    def __init__(self, port: int, topic: str) -> None:
        self.got: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"r-{uuid.uuid4().hex[:8]}"
        )
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.got.put(json.loads(m.payload))
        self.client.connect(HOST, port, 30)
        self.client.loop_start()
        self.client.subscribe(topic, 1)
        assert subscribed.wait(10), "no SUBACK for the reply topic"

    def next(self, request_id: str, within: float = 10.0) -> dict[str, Any] | None:
        try:
            while True:
                reply = self.got.get(timeout=within)
                if reply.get("request_id") == request_id:
                    return reply
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mosquitto_pub(port: int, topic: str, payload: dict[str, Any]) -> None:
    done = subprocess.run(
        [
            MOSQUITTO_PUB,
            "-h",
            HOST,
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            json.dumps(payload),
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_resume_over_mqtt_with_mosquitto_pub_after_a_sigterm(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    prefix = unique_prefix()
    cfg = config(tmp_path / "agent", port=broker.port, topic_prefix=prefix)
    reply_to = f"replies/{prefix}/resume"
    topic = f"{prefix}/{DEVICE}/cmd/resume"
    replies = Replies(broker.port, reply_to)
    try:
        with agent_process(cfg, log_name="first.log") as agent:
            agent.wait_ready()
            wid = agent.start("PaymentWithApproval", ORDER, workflow_id="order-mqtt")
            agent.wait_status(wid, "PAUSED")
            agent.terminate()
            assert agent.wait_exit() == 0
        with agent_process(cfg, log_name="second.log") as agent:
            agent.wait_ready()
            assert agent.get(wid)["status"] == "PAUSED"

            def ask(data: dict[str, Any]) -> dict[str, Any] | None:
                rid = f"mqtt-{uuid.uuid4()}"
                body = {"request_id": rid, "workflow_id": wid, "data": data, "reply_to": reply_to}
                mosquitto_pub(broker.port, topic, body)
                return replies.next(rid, within=2.0)

            # Until the agent has subscribed, a command finds nobody: ask until one answers.
            refused = poll(lambda: ask({"refund_approved": "maybe"}), bool, what="a reply")
            assert refused["ok"] is False
            assert refused["error"]["code"] == "invalid_input"
            assert "refund_approved" in refused["error"]["message"]
            assert agent.get(wid)["status"] == "PAUSED"
            assert journal(agent.database, wid) == BEFORE_PAUSE

            accepted = ask({"refund_approved": True, "approved_by": "mqtt"})
            assert accepted is not None
            assert accepted["ok"] is True
            assert accepted["workflow_id"] == wid
            done = agent.wait_status(wid, "COMPLETED", within=20)
            assert done["state"]["approved_by"] == "mqtt"
            assert journal(agent.database, wid) == WHOLE
    finally:
        replies.close()
        broker.stop()


TIMED = """\
workflow_type: {name}
workflow_version: "1"
initial_state_model: workflows.payment.models.ApprovalPaymentState
saga_mode: true
steps:
  - name: Create_Order
    function: workflows.payment.steps.create_order
    compensate_function: workflows.payment.steps.cancel_order
  - name: Approve_Refund
    type: HUMAN_INPUT
    input_model: workflows.payment.models.RefundApproval
    timeout: 3
    on_timeout: {rule}
  - name: Reserve_Inventory
    function: workflows.payment.steps.reserve_inventory
"""


def test_a_pause_timeout_is_rearmed_after_a_restart_and_applies_on_timeout(tmp_path: Path) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "goes_on.yaml").write_text(TIMED.format(name="GoesOn", rule="continue"))
    (defs / "gives_up.yaml").write_text(TIMED.format(name="GivesUp", rule="fail"))
    cfg = write_config(tmp_path / "agent", device_id=DEVICE, definitions=[str(defs)])
    with agent_process(cfg, log_name="first.log") as agent:
        agent.wait_ready()
        on = agent.start("GoesOn", ORDER, workflow_id="goes-on")
        up = agent.start("GivesUp", ORDER, workflow_id="gives-up")
        agent.wait_status(on, "PAUSED")
        agent.wait_status(up, "PAUSED")
        agent.proc.kill()  # before the 3 s run out: only the new agent's timer can end them
        agent.proc.wait(timeout=10)
    for wid in (on, up):  # read from the file, with no agent running
        assert json.loads(cli(cfg, "get", wid).stdout)["status"] == "PAUSED"
    with agent_process(cfg, log_name="second.log") as agent:
        agent.wait_ready()
        went_on = agent.wait_status(on, "COMPLETED", within=20)
        assert (went_on["state"]["refund_approved"], went_on["state"]["approved_by"]) == (
            True,
            "approve_button",  # on_timeout: continue takes the input model's defaults
        )
        assert journal(agent.database, on) == [
            ("Create_Order", "forward", 1, "completed"),
            ("Reserve_Inventory", "forward", 1, "completed"),
        ]
        gave_up = agent.wait_status(up, "FAILED_ROLLED_BACK", within=20)
        assert (
            gave_up["error"] == "no input came for step 'Approve_Refund' within its timeout of 3 s"
        )
        assert journal(agent.database, up) == [
            ("Create_Order", "forward", 1, "completed"),
            ("Create_Order", "compensate", 1, "completed"),
        ]
