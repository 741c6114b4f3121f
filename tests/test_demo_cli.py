"""`edgesaga demo`, `validate` and user mistakes on the command line, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def edgesaga(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGESAGA_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_tells_the_tutorial_story_and_exits_zero(tmp_path: Path) -> None:
    r = edgesaga("demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # success run, then the carrier failure, in the tutorial's order
    assert out.index("WORKFLOW COMPLETED SUCCESSFULLY") < out.index(
        "WORKFLOW FAILED - INITIATING ROLLBACK"
    )
    rollback = out[out.index("INITIATING ROLLBACK") :]
    assert (
        rollback.index("Releasing inventory")
        < rollback.index("Refunding payment")
        < rollback.index("Canceling order")
    )
    assert "Canceling shipment" not in out
    assert "Status: FAILED_ROLLED_BACK" in out
    assert " - release_inventory\n - refund_payment\n - cancel_order\n" in out
    assert "Irrigation (level arrives): COMPLETED" in out
    assert "Irrigation (level never arrives): FAILED_ROLLED_BACK; pump and valve off: True" in out
    assert "Traceback" not in r.stderr
    # the default embedded database holds all four runs
    db = tmp_path / ".edgesaga" / "edgesaga.db"
    assert db.exists()
    listed = edgesaga("list", "--json", cwd=tmp_path)
    rows = json.loads(listed.stdout)
    assert sorted(r["status"] for r in rows) == [
        "COMPLETED",
        "COMPLETED",
        "FAILED_ROLLED_BACK",
        "FAILED_ROLLED_BACK",
    ]
    shown = edgesaga("show", rows[-1]["workflow_id"], cwd=tmp_path)
    assert shown.returncode == 0
    assert "timeline" in shown.stdout


def test_validate_reports_a_bad_definition_in_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "workflow_type: X\nworkflow_version: '1'\ninitial_state_model: workflows.payment.models.PaymentState\n"
        "steps:\n  - name: A\n    function: workflows.payment.steps.nope\n"
    )
    r = edgesaga("validate", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("edgesaga: error: ")
    assert f"{bad}:6" in r.stderr
    assert "step 'A'" in r.stderr
    assert "nope" in r.stderr
    ok = edgesaga("validate", str(ROOT / "workflows"), cwd=tmp_path)
    assert ok.returncode == 0
    assert "PaymentProcessing 1.0.0" in ok.stdout
    assert "Irrigation 1.0.0" in ok.stdout


def test_start_mistakes_are_one_clear_sentence(tmp_path: Path) -> None:
    r = edgesaga("start", "NoSuchType", "--db", str(tmp_path / "x.db"), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "Unknown workflow type 'NoSuchType'" in r.stderr
    assert "PaymentProcessing" in r.stderr
    r = edgesaga(
        "start",
        "PaymentProcessing",
        "--data",
        "{not json",
        "--db",
        str(tmp_path / "x.db"),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "--data is not valid JSON" in r.stderr
    r = edgesaga(
        "start",
        "PaymentProcessing",
        "--data",
        '{"order_id": 1}',
        "--db",
        str(tmp_path / "x.db"),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "does not fit PaymentState" in r.stderr
    r = edgesaga("show", "nope", "--db", str(tmp_path / "missing.db"), cwd=tmp_path)
    assert r.returncode == 2
    assert "No database at" in r.stderr


def test_start_runs_in_process_and_is_idempotent_by_id(tmp_path: Path) -> None:
    data = '{"order_id": "O1", "customer_id": "C1", "amount": 5}'
    args = (
        "start",
        "PaymentProcessing",
        "--data",
        data,
        "--id",
        "order-1",
        "--db",
        str(tmp_path / "s.db"),
    )
    first = edgesaga(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("Creating order") == 1  # the steps' own prints come first
    assert json.loads(first.stdout[first.stdout.index("\n{") :])["status"] == "COMPLETED"
    again = edgesaga(*args, cwd=tmp_path)
    assert again.returncode == 0
    assert "Creating order" not in again.stdout  # the existing workflow is returned, not re-run
    rows = json.loads(
        edgesaga("list", "--json", "--db", str(tmp_path / "s.db"), cwd=tmp_path).stdout
    )
    assert [r["workflow_id"] for r in rows] == ["order-1"]


def test_start_without_an_agent_uses_the_configs_definitions_and_hardware(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        json.dumps(
            {
                "database": "db/edgesaga.db",
                "definitions": [str(ROOT / "tests" / "flows" / "hw")],
                "hardware": {
                    "pin_factory": "mock",
                    "devices": {
                        "pump": {"kind": "output", "pin": 27},
                        "valve": {"kind": "output", "pin": 17},
                    },
                },
            }
        )
    )
    r = edgesaga("start", "HwPumpA", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert out["status"] == "COMPLETED"
    assert out["state"]["gpio"]["Pump_On"]["device"] == "pump"
    assert (tmp_path / "db" / "edgesaga.db").exists()  # the config's database, relative to it
