"""The hand-written immutable records (see docs/decisions.md) behave as the frozen dataclasses they
replaced, and `edgesaga run`'s own argument reader agrees with the full argparse parser."""

from __future__ import annotations

import copy
import logging
import os
import pickle
from dataclasses import FrozenInstanceError

import pytest
from _engine_fixtures import PAYMENT_YAML

from agent import StepContext, load_definition
from agent._cli import _parser, _run_args, cmd_run
from hardware import Edge


def context(**changes: object) -> StepContext:
    fields: dict[str, object] = {
        "workflow_id": "wf-1",
        "workflow_type": "Payment",
        "step_name": "Charge",
        "attempt": 2,
        "idempotency_key": "wf-1:Charge",
        **changes,
    }
    return StepContext(**fields)  # type: ignore[arg-type]


def test_step_context_compares_hashes_and_prints_by_value() -> None:
    ctx = context()
    assert ctx == context()
    assert ctx != context(attempt=3)
    assert ctx != "wf-1"
    hashable = {"params": (), "outputs": ()}
    assert hash(context(**hashable)) == hash(context(**hashable))  # hashable when its fields are
    assert repr(ctx).startswith("StepContext(workflow_id='wf-1', workflow_type='Payment', ")
    assert ctx.params == {}
    assert ctx.hardware is None
    assert ctx.compensating is False
    assert ctx.outputs == {}
    assert ctx.outputs is not context().outputs  # each step its own
    assert ctx.logger is logging.getLogger("edgesaga.step")


def test_step_context_is_frozen_and_has_no_dict() -> None:
    ctx = context()
    with pytest.raises(FrozenInstanceError):
        ctx.attempt = 5  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del ctx.attempt  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ctx.__dict__  # noqa: B018 - slotted
    assert ctx.attempt == 2


def test_step_context_copies_pickles_and_matches() -> None:
    ctx = context(params={"litres": 5})
    assert copy.copy(ctx) == ctx
    assert copy.deepcopy(ctx) == ctx
    clone = pickle.loads(pickle.dumps(context(logger=None)))
    assert clone == context()
    match ctx:
        case StepContext("wf-1", _, "Charge", attempt):
            assert attempt == 2
        case _:
            pytest.fail("positional match on StepContext failed")


def test_loaded_definitions_compare_by_value() -> None:
    one, two = load_definition(PAYMENT_YAML), load_definition(PAYMENT_YAML)
    assert one == two
    assert one.steps[0] == two.steps[0]
    assert one.steps[0] != one.steps[1]
    with pytest.raises(FrozenInstanceError):
        one.hash = "x"  # type: ignore[misc]


def test_edge_is_a_value() -> None:
    edge = Edge("level", True, 1.5)
    assert edge == Edge("level", True, 1.5)
    assert edge != Edge("level", False, 1.5)
    assert len({edge, Edge("level", True, 1.5)}) == 1
    assert repr(edge) == "Edge(device='level', value=True, at=1.5)"
    with pytest.raises(FrozenInstanceError):
        edge.value = False  # type: ignore[misc]


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "--config", "/etc/edgesaga/agent.yaml"],
        ["run", "--config=/etc/edgesaga/agent.yaml"],
        ["run", "--config", "relative dir/agent.yaml"],
    ],
)
def test_run_command_line_reads_as_argparse_reads_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGESAGA_LOG_LEVEL", "INFO")
    fast = _run_args(argv)
    assert fast is not None
    full = _parser().parse_args(argv)
    assert (fast.command, fast.config, fast.log_level, fast.func) == (
        full.command,
        full.config,
        full.log_level,
        full.func,
    )
    assert fast.func is cmd_run


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run", "--help"],
        ["run", "--config"],
        ["run", "--config", "--log-level"],
        ["run", "--config="],
        ["--log-level", "DEBUG", "run"],
        ["run", "--config", "a.yaml", "extra"],
        ["list"],
    ],
)
def test_other_command_lines_go_to_argparse(argv: list[str]) -> None:
    assert _run_args(argv) is None


def test_the_command_skips_pydantic_plugin_discovery_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.__main__ import main

    monkeypatch.setattr("sys.argv", ["edgesaga", "validate", str(PAYMENT_YAML)])
    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS", raising=False)
    assert main() == 0
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "")  # a deployment that wants its plugins
    assert main() == 0
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == ""
