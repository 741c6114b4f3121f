"""The bundled control-flow examples, loaded from workflows/ and run on mock pins with a real SQLite
file: SoilIrrigation (a DECISION on the soil sensor), TwoBeds (a PARALLEL of two valves) and
PaymentWithApproval (a refund gated by a HUMAN_INPUT approval). Each test asserts the path taken
(the journal) and the exact history of every pin it drives."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from agent import SQLiteStore, WorkflowBuilder
from agent._errors import InvalidTransition
from hardware import Board, load_board_config
from tests._hw_fixtures import states

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
IRRIGATION = ROOT / "workflows" / "irrigation"
PAYMENT = ROOT / "workflows" / "payment"
ORDER = {"order_id": "ORD-1", "customer_id": "CUST-1", "amount": 12.5}


def journal_of(rows: list[Any]) -> list[tuple[str, str, str]]:
    return [(j.step, j.phase, j.outcome) for j in rows]


@pytest.fixture
def garden(mock_factory: MockFactory) -> Any:
    """A board wired like workflows/irrigation/garden.yaml, on mock pins."""
    with Board.from_config(
        load_board_config(IRRIGATION / "garden.yaml"), pin_factory=mock_factory
    ) as b:
        yield b


def fast(tmp_path: Path, name: str) -> Path:
    """A copy of a bundled definition whose float-switch wait gives up after 0.2 s, not 3 s."""
    text = (IRRIGATION / name).read_text()
    assert "timeout: 3," in text
    copy = tmp_path / name
    copy.write_text(text.replace("timeout: 3,", "timeout: 0.2,"))
    return copy


async def level_after(board: Board, seconds: float) -> None:
    """The float switch closes after ``seconds``, driven from another thread like a GPIO callback."""
    await asyncio.sleep(seconds)
    await asyncio.get_running_loop().run_in_executor(None, board.set_input, "level", True)


async def run_with_level(
    builder: WorkflowBuilder, store: SQLiteStore, board: Board, wtype: str
) -> Any:
    filler = asyncio.create_task(level_after(board, 0.05))
    try:
        return await builder.start_workflow(wtype, {"zone": "B"}, store=store)
    finally:
        await filler


# -- SoilIrrigation: a DECISION on the soil sensor ----------------------------------------------------


async def test_dry_soil_takes_the_watering_route(garden: Board, tmp_path: Path) -> None:
    garden.set_input("soil", True)
    builder = WorkflowBuilder(definitions=[IRRIGATION], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await run_with_level(builder, store, garden, "SoilIrrigation")
        journal = await store.journal(wf.id)
    assert wf.status == "COMPLETED"
    assert wf.state.level_reached is True
    assert journal_of(journal) == [
        ("Check_Soil", "forward", "completed"),
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Wait_For_Level", "forward", "completed"),
        ("Stop_Pump", "forward", "completed"),
        ("Close_Valve", "forward", "completed"),
    ]
    assert states(garden, "valve") == [False, True, False]
    assert states(garden, "pump") == [False, True, False]


async def test_wet_soil_ends_after_the_decision_and_switches_nothing(
    garden: Board, tmp_path: Path
) -> None:
    garden.set_input("soil", False)
    builder = WorkflowBuilder(definitions=[IRRIGATION], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("SoilIrrigation", {"zone": "B"}, store=store)
        journal = await store.journal(wf.id)
    assert wf.status == "COMPLETED"
    assert journal_of(journal) == [("Check_Soil", "forward", "completed")]
    assert states(garden, "valve") == [False]
    assert states(garden, "pump") == [False]


async def test_a_failure_on_the_dry_route_undoes_only_that_route(
    garden: Board, tmp_path: Path
) -> None:
    garden.set_input("soil", True)
    builder = WorkflowBuilder(definitions=[fast(tmp_path, "soil.yaml")], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("SoilIrrigation", store=store)  # the level never comes
        journal = await store.journal(wf.id)
    assert wf.status == "FAILED_ROLLED_BACK"
    assert journal_of(journal) == [
        ("Check_Soil", "forward", "completed"),
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Wait_For_Level", "forward", "failed"),
        ("Start_Pump", "compensate", "completed"),
        ("Open_Valve", "compensate", "completed"),
    ]
    assert states(garden, "valve") == [False, True, False]
    assert states(garden, "pump") == [False, True, False]


# -- TwoBeds: a PARALLEL of two valves ------------------------------------------------------------------


async def test_two_beds_open_and_close_both_valves(garden: Board, tmp_path: Path) -> None:
    builder = WorkflowBuilder(definitions=[IRRIGATION], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await run_with_level(builder, store, garden, "TwoBeds")
        journal = journal_of(await store.journal(wf.id))
    assert wf.status == "COMPLETED"
    # The branches' steps commit in completion order: either valve may be first.
    assert sorted(journal[:2]) == [
        ("Open_Valve_A", "forward", "completed"),
        ("Open_Valve_B", "forward", "completed"),
    ]
    assert journal[2] == ("Wait_For_Level", "forward", "completed")
    assert sorted(journal[3:]) == [
        ("Close_Valve_A", "forward", "completed"),
        ("Close_Valve_B", "forward", "completed"),
    ]
    assert len(journal) == 5
    assert states(garden, "valve_a") == [False, True, False]
    assert states(garden, "valve_b") == [False, True, False]
    assert states(garden, "valve") == [False]  # the single-bed valve is not part of it


async def test_two_beds_roll_back_both_branches_newest_first(garden: Board, tmp_path: Path) -> None:
    builder = WorkflowBuilder(definitions=[fast(tmp_path, "two_beds.yaml")], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("TwoBeds", store=store)  # the level never comes
        journal = journal_of(await store.journal(wf.id))
    assert wf.status == "FAILED_ROLLED_BACK"
    opened = [step for step, phase, _ in journal[:2]]
    assert sorted(opened) == ["Open_Valve_A", "Open_Valve_B"]
    assert journal[2:] == [
        ("Wait_For_Level", "forward", "failed"),
        # newest completion first
        (opened[1], "compensate", "completed"),
        (opened[0], "compensate", "completed"),
    ]
    assert states(garden, "valve_a") == [False, True, False]
    assert states(garden, "valve_b") == [False, True, False]


# -- PaymentWithApproval: the refund waits for a person -------------------------------------------


@pytest.fixture
async def payments(tmp_path: Path) -> AsyncIterator[tuple[WorkflowBuilder, SQLiteStore]]:
    builder = WorkflowBuilder(definitions=[PAYMENT])
    async with SQLiteStore(tmp_path / "payments.db") as store:
        yield builder, store


async def paused_order(builder: WorkflowBuilder, store: SQLiteStore) -> Any:
    """A PaymentWithApproval whose shipment will fail, driven to its pause."""
    data = {**ORDER, "fail_step": "Create_Shipment"}
    wf = await builder.start_workflow("PaymentWithApproval", data, store=store)
    assert wf.status == "PAUSED"
    assert wf.current_step == "Approve_Refund"
    return wf


async def test_approval_pauses_after_the_charge_and_an_approved_refund_is_made(payments) -> None:
    builder, store = payments
    wf = await paused_order(builder, store)
    assert journal_of(await store.journal(wf.id)) == [
        ("Create_Order", "forward", "completed"),
        ("Charge_Payment", "forward", "completed"),
    ]
    waiting = builder.waiting_input(wf)
    assert waiting["step"] == "Approve_Refund"
    assert waiting["approve_with"] == "approve_button"
    assert set(waiting["schema"]["properties"]) == {"refund_approved", "approved_by"}

    wf = await builder.resume(store, wf.id, {"refund_approved": True, "approved_by": "alice"})
    await wf.run()
    assert wf.status == "FAILED_ROLLED_BACK"
    assert wf.state.approved_by == "alice"
    assert wf.state.compensations_run == ["release_inventory", "refund_payment", "cancel_order"]
    assert journal_of(await store.journal(wf.id))[2:] == [
        ("Reserve_Inventory", "forward", "completed"),
        ("Create_Shipment", "forward", "failed"),
        ("Reserve_Inventory", "compensate", "completed"),
        ("Charge_Payment", "compensate", "completed"),
        ("Create_Order", "compensate", "completed"),
    ]


async def test_invalid_approval_names_the_field_and_the_order_stays_paused(payments) -> None:
    from agent._errors import AgentError

    builder, store = payments
    wf = await paused_order(builder, store)
    with pytest.raises(AgentError) as refused:
        await builder.resume(store, wf.id, {"refund_approved": "maybe"})
    assert refused.value.code == "invalid_input"
    assert "refund_approved" in str(refused.value)
    rec = await store.load_instance(wf.id)
    assert rec is not None
    assert rec.status == "PAUSED"
    assert rec.state["refund_approved"] is False  # nothing of the refused input was kept


async def test_a_refund_not_approved_is_left_to_a_person(payments) -> None:
    builder, store = payments
    wf = await paused_order(builder, store)
    wf = await builder.resume(store, wf.id, {"refund_approved": False, "approved_by": "bob"})
    await wf.run()
    assert wf.status == "COMPENSATION_FAILED"
    refusal = (
        f"Exception: Refund of {wf.state.transaction_id} needs a person's approval and "
        "Approve_Refund did not approve it; a person refunds it by hand"
    )
    assert wf.error == refusal
    assert [(j.step, j.phase, j.outcome, j.error) for j in await store.journal(wf.id)][2:] == [
        ("Reserve_Inventory", "forward", "completed", None),
        ("Create_Shipment", "forward", "failed", "Exception: Carrier API unavailable"),
        ("Reserve_Inventory", "compensate", "completed", None),
        ("Charge_Payment", "compensate", "failed", refusal),  # once: compensate_retry 1
        ("Create_Order", "compensate", "completed", None),
    ]
    # the other compensations still ran; the refund did not
    assert wf.state.compensations_run == ["release_inventory", "cancel_order"]
    assert wf.state.payment_charged is True


async def test_a_completed_approval_cannot_be_resumed_again(payments) -> None:
    builder, store = payments
    wf = await builder.start_workflow("PaymentWithApproval", dict(ORDER), store=store)
    wf = await builder.resume(store, wf.id, {})  # the button's defaults: approved
    await wf.run()
    assert wf.status == "COMPLETED"
    assert (wf.state.refund_approved, wf.state.approved_by) == (True, "approve_button")
    with pytest.raises(InvalidTransition):
        await builder.resume(store, wf.id, {})


# -- the demo ------------------------------------------------------------------------------------


def demo(part: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGESAGA_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "agent", "demo", part],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_irrigation_demo_shows_a_watered_and_a_skipped_run(tmp_path: Path) -> None:
    r = demo("irrigation", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PaymentProcessing" not in r.stdout
    assert (
        "Irrigation (level never arrives): FAILED_ROLLED_BACK; pump and valve off: True" in r.stdout
    )
    assert "  path         Check_Soil\n" in r.stdout  # the wet run: nothing after the decision
    assert "SoilIrrigation (dry soil): COMPLETED, watered" in r.stdout
    assert "SoilIrrigation (wet soil): COMPLETED, skipped after Check_Soil" in r.stdout
    assert "TwoBeds (two valves at once): COMPLETED; all valves off: True" in r.stdout
    assert "Traceback" not in r.stderr


def test_payment_demo_pauses_for_the_refund_approval(tmp_path: Path) -> None:
    r = demo("payment", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "PAUSED at Approve_Refund: waiting for refund_approved, approved_by" in out
    assert "resume with refund_approved=\"maybe\" refused: Field 'refund_approved'" in out
    approval = out[out.index("PAYMENT WITH REFUND APPROVAL") :]
    assert (
        approval.index("Refund approved by demo; the workflow goes on")
        < approval.index("Releasing inventory")
        < approval.index("Refunding payment")
        < approval.index("Canceling order")
    )
    assert (
        "PaymentWithApproval (approved, carrier fails): FAILED_ROLLED_BACK, refund approved and made"
        in out
    )
    assert "IRRIGATION" not in out
