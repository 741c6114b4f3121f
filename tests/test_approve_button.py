"""approve_with: a press of the button a HUMAN_INPUT step names resumes the oldest workflow paused on
it, with the input model's defaults, through the agent's one operator path.

A real ``edgesaga run`` subprocess on mock pins runs the bundled PaymentWithApproval, whose
Approve_Refund step says ``approve_with: approve_button``; the press is the control socket's
``set_input`` driving that mock pin (the pin's edge reaches the agent as a gpiozero callback would).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.flows.service.harness import ROOT, agent_process, journal, poll, write_config

pytestmark = pytest.mark.timeout(90)

ORDER = {"order_id": "ORD-7", "customer_id": "CUST-7", "amount": 20.0}
#: The agent's hardware section is the bundled devices file of the example (mock pins).
HARDWARE = yaml.safe_load((ROOT / "workflows" / "payment" / "devices.yaml").read_text())
BEFORE_PAUSE = [
    ("Create_Order", "forward", 1, "completed"),
    ("Charge_Payment", "forward", 1, "completed"),
]
AFTER_RESUME = [
    ("Reserve_Inventory", "forward", 1, "completed"),
    ("Create_Shipment", "forward", 1, "completed"),
]


def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path, definitions=[], include_bundled=True, hardware=HARDWARE, device_id="approve-dev"
    )


def press(agent, device: str = "approve_button") -> None:
    for value in (True, False):  # pressed, then released
        reply = agent.request("set_input", device=device, value=value)
        assert reply["ok"], reply


def test_a_press_resumes_the_oldest_paused_workflow_with_the_defaults(tmp_path: Path) -> None:
    with agent_process(config(tmp_path)) as agent:
        agent.wait_ready()
        first = agent.start("PaymentWithApproval", ORDER, workflow_id="order-1")
        agent.wait_status(first, "PAUSED")
        second = agent.start("PaymentWithApproval", ORDER, workflow_id="order-2")
        agent.wait_status(second, "PAUSED")

        press(agent)
        done = agent.wait_status(first, "COMPLETED", within=20)
        assert done["state"]["refund_approved"] is True
        assert done["state"]["approved_by"] == "approve_button"  # the model's defaults
        assert journal(agent.database, first) == BEFORE_PAUSE + AFTER_RESUME
        # one press, one approval: the younger order still waits
        assert agent.get(second)["status"] == "PAUSED"
        assert journal(agent.database, second) == BEFORE_PAUSE

        press(agent)
        agent.wait_status(second, "COMPLETED", within=20)
        assert journal(agent.database, second) == BEFORE_PAUSE + AFTER_RESUME
        log = agent.log_text()
        assert "approve_button pressed: resume order-1" in log
        assert "approve_button pressed: resume order-2" in log

        # nothing waits any more: a press changes nothing and the agent goes on serving
        press(agent)
        poll(
            agent.log_text,
            lambda text: "approve_button pressed, but no workflow waits on it" in text,
            what="the unused press to be logged",
        )
        assert agent.request("status")["counts"] == {"COMPLETED": 2}


def test_a_press_approves_a_workflow_that_paused_before_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with agent_process(cfg, log_name="first.log") as agent:
        agent.wait_ready()
        wid = agent.start("PaymentWithApproval", ORDER, workflow_id="order-9")
        agent.wait_status(wid, "PAUSED")
        agent.proc.kill()  # SIGKILL while it waits
        agent.proc.wait(timeout=10)
    with agent_process(cfg, log_name="second.log") as agent:
        agent.wait_ready()
        assert agent.get(wid)["status"] == "PAUSED"
        press(agent)
        agent.wait_status(wid, "COMPLETED", within=20)
        assert journal(agent.database, wid) == BEFORE_PAUSE + AFTER_RESUME
