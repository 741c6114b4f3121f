"""Helpers shared by the engine test modules (definitions written per test, payment data).

Fixtures that need a store are defined in each module (a real SQLite file in ``tmp_path``); this
module only holds plain helpers so nothing here depends on pytest's fixture discovery.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The test step modules are imported by dotted path (``tests.flows.engine.steps``), which needs
# the repository root on sys.path also when pytest is started from elsewhere.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAYMENT_DIR = ROOT / "workflows" / "payment"
PAYMENT_YAML = PAYMENT_DIR / "payment.yaml"
DEFS_DIR = ROOT / "tests" / "defs"
STEPS = "tests.flows.engine.steps"
MODEL = "tests.flows.engine.models.EngineState"

PAYMENT_DATA: dict[str, Any] = {
    "order_id": "ORD-12345",
    "customer_id": "CUST-789",
    "amount": 299.99,
    "currency": "USD",
}
PAYMENT_STEPS = ["Create_Order", "Charge_Payment", "Reserve_Inventory", "Create_Shipment"]


def step(name: str, function: str, compensate: str | None = None, **extra: Any) -> dict[str, Any]:
    """One step entry; ``function``/``compensate`` are names in the engine test step module."""
    out: dict[str, Any] = {"name": name, "type": "STANDARD", "function": f"{STEPS}.{function}"}
    if compensate:
        out["compensate_function"] = f"{STEPS}.{compensate}"
    out.update(extra)
    return out


def write_definition(
    directory: Path,
    steps: list[dict[str, Any]],
    *,
    workflow_type: str = "EngineTest",
    version: str = "1.0.0",
    saga_mode: bool = False,
    filename: str | None = None,
) -> Path:
    """Write a workflow definition YAML into ``directory`` and return its path."""
    body = {
        "workflow_type": workflow_type,
        "workflow_version": version,
        "initial_state_model": MODEL,
        "saga_mode": saga_mode,
        "steps": steps,
    }
    path = directory / (filename or f"{workflow_type}.yaml")
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path
