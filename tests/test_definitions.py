"""Workflow definitions: every malformed file fails at load with file, step and line named, and a
definition snapshot stored with each instance keeps old instances on their version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _engine_fixtures import DEFS_DIR, PAYMENT_DATA, PAYMENT_YAML, step, write_definition

from agent import (
    DefinitionError,
    SQLiteStore,
    UnknownWorkflowType,
    WorkflowBuilder,
    WorkflowStatus,
    load_definition,
)
from tests.flows.engine.models import EngineState
from tests.flows.engine.steps import names

MARK = "# <-- error"


def marked_line(path: Path) -> int:
    """The 1-based line carrying the ``# <-- error`` marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if MARK in line]
    assert len(hits) == 1, f"{path} needs exactly one marker"
    return hits[0]


# file, step named in the message (or None), key (or None), a phrase the message must contain
BAD = [
    ("malformed_yaml.yaml", None, None, "malformed YAML"),
    ("not_a_mapping.yaml", None, None, "must be a YAML mapping"),
    ("unknown_top_key.yaml", None, "colour", "unknown key 'colour'"),
    ("unknown_step_key.yaml", "Two", "retires", "unknown key 'retires'"),
    ("unknown_step_type.yaml", "Loop_Forever", "type", "unknown step type 'LOOP'"),
    ("missing_module.yaml", "Two", "function", "no_such_module"),
    ("missing_attribute.yaml", "One", "compensate_function", "no_such_undo"),
    ("not_callable.yaml", "One", "function", "is not callable"),
    ("signature_extra_param.yaml", "Measure", "function", "unexpected keyword argument 'level'"),
    ("signature_missing_param.yaml", "Fill", "function", "missing a required argument: 'level'"),
    ("duplicate_step.yaml", "Same", "name", "duplicate step name"),
    ("state_not_a_model.yaml", None, "initial_state_model", "not a pydantic BaseModel"),
    ("bad_retry_value.yaml", "Flaky", "max_attempts", "greater than or equal to 1"),
    # issue 10 #7: a key given twice, both lines named
    ("duplicate_key.yaml", None, "workflow_type", "given twice, on lines 2 and 5"),
    # issue 10 #17: what used to fail only when the step ran
    ("unknown_state_field_param.yaml", "Read_Level", "field", "no field 'level_reached'"),
    ("negative_seconds_param.yaml", "Run_Pump", "seconds", "a number of seconds (0 or more)"),
]


@pytest.mark.parametrize(("filename", "step_name", "key", "phrase"), BAD)
def test_bad_definition_names_file_step_and_line(
    filename: str, step_name: str | None, key: str | None, phrase: str
) -> None:
    path = DEFS_DIR / filename
    line = marked_line(path)
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    err = info.value
    message = str(err)
    assert err.path == str(path)
    assert err.line == line
    assert f"{path}:{line}" in message
    assert phrase in message
    assert err.step == step_name
    if step_name is not None:
        assert f"step {step_name!r}" in message
    assert err.key == key
    assert "more problem" not in message  # exactly one problem in each file, reported once
    assert isinstance(err, ValueError)  # DefinitionError is also a ValueError


@pytest.mark.parametrize(("filename", "step_name", "key", "phrase"), BAD[:4])
def test_builder_refuses_a_bad_definition(
    filename: str, step_name: str | None, key: str | None, phrase: str
) -> None:
    with pytest.raises(DefinitionError, match=filename.replace(".", r"\.")):
        WorkflowBuilder(definitions=[DEFS_DIR / filename])


def test_missing_definition_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(DefinitionError, match="no such file") as info:
        WorkflowBuilder(definitions=[missing])
    assert str(missing) in str(info.value)


def test_bundled_payment_definition_loads() -> None:
    d = load_definition(PAYMENT_YAML)
    assert d.workflow_type == "PaymentProcessing"
    assert d.version == "1.0.0"
    assert d.state_model.__name__ == "PaymentState"
    assert [s.name for s in d.steps] == [
        "Create_Order",
        "Charge_Payment",
        "Reserve_Inventory",
        "Create_Shipment",
    ]
    assert all(s.compensate is not None for s in d.steps)
    assert [s.spec.automate_next for s in d.steps] == [True, True, True, False]
    assert d.spec.saga_mode is False  # the tutorial turns it on with enable_saga_mode()
    assert len(d.hash) == 64
    assert json.loads(d.snapshot)["workflow_type"] == "PaymentProcessing"
    # Loading twice gives the same hash: the snapshot is canonical.
    assert load_definition(PAYMENT_YAML).hash == d.hash
    d.state_model.model_validate(PAYMENT_DATA)


def test_workflow_version_as_number_is_kept_as_text(tmp_path: Path) -> None:
    path = write_definition(tmp_path, [step("One", "record")])
    path.write_text(path.read_text().replace("workflow_version: 1.0.0", "workflow_version: 1.5"))
    assert load_definition(path).version == "1.5"


def test_two_files_defining_one_type_are_refused(tmp_path: Path) -> None:
    write_definition(tmp_path, [step("One", "record")], filename="a.yaml")
    write_definition(tmp_path, [step("Other", "record")], filename="b.yaml")
    with pytest.raises(DefinitionError, match="defined once"):
        WorkflowBuilder(definitions=[tmp_path])


def test_unknown_workflow_type(tmp_path: Path) -> None:
    builder = WorkflowBuilder(definitions=[write_definition(tmp_path, [step("One", "record")])])
    with pytest.raises(UnknownWorkflowType, match="EngineTest"):
        builder.definition("NoSuchType")


# ------------------------------------------------------------------------------------------------
# Definition snapshots


async def test_snapshot_and_hash_are_stored_with_the_instance(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = write_definition(tmp_path, [step("One", "record"), step("Two", "record")])
    builder = WorkflowBuilder(definitions=[path])
    definition = builder.definition("EngineTest")
    wf = await builder.create_workflow("EngineTest", {}, store=store)

    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.definition_hash == definition.hash
    assert record.definition == definition.snapshot
    snapshot = json.loads(record.definition)
    assert snapshot["workflow_version"] == "1.0.0"
    assert [s["name"] for s in snapshot["steps"]] == ["One", "Two"]


async def test_instance_finishes_under_its_own_version(tmp_path: Path) -> None:
    db = tmp_path / "edgesaga.db"
    wf_dir = tmp_path / "defs"
    wf_dir.mkdir()
    path = write_definition(wf_dir, [step("V1_First", "record"), step("V1_Second", "record")])

    async with SQLiteStore(db) as store:
        builder = WorkflowBuilder(definitions=[wf_dir])
        v1_hash = builder.definition("EngineTest").hash
        wf = await builder.create_workflow("EngineTest", {}, store=store)
        await wf.next_step()  # V1_First only (no automate_next)
        assert wf.status is WorkflowStatus.ACTIVE
        assert wf.state.log == ["V1_First"]
        wid = wf.id

    # The YAML is replaced by v2 (other steps) while the instance waits.
    path.unlink()
    write_definition(
        wf_dir,
        [step("V2_A", "record"), step("V2_B", "record"), step("V2_C", "record")],
        version="2.0.0",
    )
    async with SQLiteStore(db) as store:
        builder2 = WorkflowBuilder(definitions=[wf_dir])
        assert builder2.definition("EngineTest").version == "2.0.0"
        assert builder2.definition("EngineTest").hash != v1_hash

        old = await builder2.load_workflow(wid, store)
        assert old.definition.version == "1.0.0"
        assert old.definition.hash == v1_hash
        assert await old.run() is WorkflowStatus.COMPLETED
        assert old.state.log == ["V1_First", "V1_Second"]
        assert [e.step for e in await store.journal(wid)] == ["V1_First", "V1_Second"]

        # New instances use v2.
        new = await builder2.create_workflow("EngineTest", {}, store=store)
        assert await new.run() is WorkflowStatus.COMPLETED
        assert new.state.log == ["V2_A", "V2_B", "V2_C"]
        record = await store.load_instance(new.id)
        assert record is not None
        assert record.definition_hash != v1_hash
    assert names(wid) == ["V1_First", "V1_Second"]
    assert EngineState.model_validate(record.state).log == ["V2_A", "V2_B", "V2_C"]
