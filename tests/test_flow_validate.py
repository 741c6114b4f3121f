"""Validation of routes, DECISION, HUMAN_INPUT, PARALLEL and pivot steps (DESIGN §10): each rule
refuses a definition in one sentence naming the file, the line, the step and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from _engine_fixtures import ROOT  # noqa: F401  (puts the repository on sys.path)

from agent import DefinitionError, load_definition

MARK = "# <-- error"
HEAD = """workflow_type: FlowCheck
workflow_version: "1.0.0"
initial_state_model: tests.flows.core.models.FlowState
saga_mode: true
steps:
"""
S = "tests.flows.core.steps"
M = "tests.flows.core.models"


def refused(tmp_path: Path, steps: str) -> tuple[DefinitionError, Path, int]:
    path = tmp_path / "flow.yaml"
    text = HEAD + steps.replace("$S", S).replace("$M", M)
    path.write_text(text, encoding="utf-8")
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if MARK in line]
    assert len(lines) == 1
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    return info.value, path, lines[0]


# steps, step named, key named, a phrase of the sentence
CASES = [
    (
        """  - name: A
    function: $S.do
    next: Nowhere  # <-- error
""",
        "A",
        "next",
        "'Nowhere', which is no step of this workflow",
    ),
    (
        """  - name: Pick
    type: DECISION
    function: $S.choose
    routes:
      x: B
      y: Missing  # <-- error
  - name: B
    function: $S.do
""",
        "Pick",
        "routes",
        "'Missing', which is no step",
    ),
    (
        """  - name: Pick
    type: DECISION
    function: $S.choose
    routes: {x: B}
    default: Gone  # <-- error
  - name: B
    function: $S.do
""",
        "Pick",
        "default",
        "'Gone', which is no step",
    ),
    (
        """  - name: A
    function: $S.do
    next: END
  - name: Lost  # <-- error
    function: $S.do
""",
        "Lost",
        "name",
        "unreachable",
    ),
    (
        """  - name: A
    function: $S.do
  - name: B
    function: $S.do
    next: A  # <-- error
""",
        "B",
        "next",
        "cycle A → B → A; loops are not supported: use retry or a schedule",
    ),
    (
        """  - name: A
    function: $S.do
  - name: Both
    type: PARALLEL
    branches:
      - [{name: A, function: $S.do}]  # <-- error
      - [{name: C, function: $S.do}]
""",
        "A",
        "name",
        "duplicate step name",
    ),
    (
        """  - name: Both
    type: PARALLEL
    branches:
      - - name: X
          function: $S.do
          next: END  # <-- error
      - [{name: Y, function: $S.do}]
""",
        "X",
        "next",
        "runs in list order and takes no 'next'",
    ),
    (
        """  - name: Both
    type: PARALLEL
    branches:
      - - name: X
          type: HUMAN_INPUT  # <-- error
      - [{name: Y, function: $S.do}]
""",
        "X",
        "type",
        "STANDARD and DELAY steps only, not a HUMAN_INPUT step",
    ),
    (
        """  - name: Both
    type: PARALLEL
    branches:  # <-- error
      - [{name: Y, function: $S.do}]
""",
        "Both",
        "branches",
        "at least two branches",
    ),
    (
        """  - name: Ask
    type: HUMAN_INPUT
    input_model: $M.NotAModel  # <-- error
""",
        "Ask",
        "input_model",
        "is not a pydantic BaseModel",
    ),
    (
        """  - name: Ask
    type: HUMAN_INPUT
    input_model: $M.NoSuchModel  # <-- error
""",
        "Ask",
        "input_model",
        "cannot import the input model",
    ),
    (
        """  - name: Ask
    type: HUMAN_INPUT
    input_model: $M.UnknownFieldInput  # <-- error
""",
        "Ask",
        "input_model",
        "field 'colour' is not a field of the state model FlowState",
    ),
    (
        """  - name: Ask
    type: HUMAN_INPUT
    input_model: $M.WrongTypeInput  # <-- error
""",
        "Ask",
        "input_model",
        "field 'approved' is str, but the state model's is bool",
    ),
    (
        """  - name: Ask
    type: HUMAN_INPUT
    function: $S.do  # <-- error
""",
        "Ask",
        "function",
        "a HUMAN_INPUT step takes no 'function'",
    ),
    (
        """  - name: A  # <-- error
    function: $S.do
  - name: Charge
    function: $S.do
    pivot: true
""",
        "A",
        "compensate_function",
        "runs before the pivot 'Charge' but has no compensate_function",
    ),
    (
        """  - name: Charge
    function: $S.do
    pivot: true
  - name: Ship
    function: $S.do
    compensate_function: $S.undo  # <-- error
    retry: {max_attempts: 3}
""",
        "Ship",
        "compensate_function",
        "after the pivot 'Charge'",
    ),
    (
        """  - name: Charge
    function: $S.do
    pivot: true
  - name: Ship  # <-- error
    function: $S.do
""",
        "Ship",
        "retry",
        "retry.max_attempts greater than 1",
    ),
    (
        """  - name: Charge
    function: $S.do
    pivot: true
  - name: Other
    function: $S.do
    retry: {max_attempts: 2}
    pivot: true  # <-- error
""",
        "Other",
        "pivot",
        "only one step can be the pivot",
    ),
    (
        """  - name: Both
    type: PARALLEL
    branches:
      - - name: X
          function: $S.do
          pivot: true  # <-- error
      - [{name: Y, function: $S.do}]
""",
        "X",
        "pivot",
        "a pivot cannot be inside a PARALLEL's branch",
    ),
    (
        """  - name: Wait  # <-- error
    type: DELAY
""",
        "Wait",
        None,
        "needs exactly one of 'duration' (seconds) and 'until'",
    ),
    (
        """  - name: Wait
    type: DELAY
    duration: 5
    function: $S.do  # <-- error
""",
        "Wait",
        "function",
        "a DELAY step takes no 'function'",
    ),
    (
        """  - name: Wait
    type: DELAY
    until: "25:00"  # <-- error
""",
        "Wait",
        "until",
        "neither a time of day HH:MM nor an ISO-8601",
    ),
    (
        """  - name: Wait
    type: DELAY
    until: "06:30"
    timezone: Mars/Olympus  # <-- error
""",
        "Wait",
        "timezone",
        "unknown time zone 'Mars/Olympus'",
    ),
    (
        """  - name: Wait
    type: DELAY
    duration: 5
    timezone: UTC  # <-- error
""",
        "Wait",
        "timezone",
        "'timezone' goes with 'until' only",
    ),
    (
        """  - name: P
    type: PARALLEL
    branches:
      - - name: X
          type: DELAY
          duration: 1
          next: END  # <-- error
      - [{name: Y, function: $S.do}]
""",
        "X",
        "next",
        "a step in a PARALLEL's branch runs in list order and takes no 'next'",
    ),
    (
        """  - name: P
    type: PARALLEL
    branches:
      - - name: X
          type: DELAY
          duration: 1
          function: $S.do  # <-- error
      - [{name: Y, function: $S.do}]
""",
        "X",
        "function",
        "a DELAY step takes no 'function'",
    ),
    (
        """  - name: Pick  # <-- error
    type: DECISION
    function: $S.choose
""",
        "Pick",
        None,
        "needs 'routes'",
    ),
]


@pytest.mark.parametrize(("steps", "step", "key", "phrase"), CASES)
def test_each_rule_names_file_line_step_and_key(
    tmp_path: Path, steps: str, step: str, key: str | None, phrase: str
) -> None:
    err, path, line = refused(tmp_path, steps)
    message = str(err)
    assert phrase in message
    assert f"{path}:{line}" in message
    assert f"step {step!r}" in message
    assert err.step == step
    assert err.key == key
    if key is not None:
        assert f"key {key!r}" in message
    assert "Traceback" not in message


def test_a_valid_flow_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        HEAD
        + f"""  - name: Pick
    type: DECISION
    function: {S}.choose
    routes: {{a: Left, b: Right, stop: END}}
    default: Left
  - name: Left
    function: {S}.do
    compensate_function: {S}.undo
    next: Ask
  - name: Right
    function: {S}.do
    compensate_function: {S}.undo
  - name: Ask
    type: HUMAN_INPUT
    input_model: {M}.Approval
    timeout: 60
    on_timeout: continue
  - name: Both
    type: PARALLEL
    branches:
      - [{{name: X1, function: {S}.do, compensate_function: {S}.undo}}, {{name: X2, function: {S}.do}}]
      - [{{name: Y1, function: {S}.do}}]
""",
        encoding="utf-8",
    )
    d = load_definition(path)
    assert [s.name for s in d.steps] == ["Pick", "Left", "Right", "Ask", "Both"]
    assert d.step("X2").name == "X2"
    assert d.step("Ask").input_model is not None
    assert d.step("Ask").input_model.__name__ == "Approval"


@pytest.mark.parametrize(
    ("devices", "phrase"),
    [
        ({"button": "button"}, None),
        ({"valve": "output"}, "'approve_button', which is not a device"),
        ({"approve_button": "output"}, "needs a button or input device"),
        (None, "known devices: none"),
    ],
)
def test_approve_with_is_checked_against_the_board(
    tmp_path: Path, devices: dict[str, str] | None, phrase: str | None
) -> None:
    from types import SimpleNamespace

    from agent._definition import load_definition_and_node
    from agent._validate import check_approve_with

    path = tmp_path / "ask.yaml"
    text = HEAD + "  - name: Ask\n    type: HUMAN_INPUT\n    approve_with: approve_button  # here\n"
    path.write_text(text, encoding="utf-8")
    definition, node = load_definition_and_node(path)
    board = None if devices is None else {n: SimpleNamespace(kind=k) for n, k in devices.items()}
    if devices == {"button": "button"}:
        board = {"approve_button": SimpleNamespace(kind="button")}
    problems = check_approve_with(definition, board, node)
    if phrase is None:
        assert problems == []
        return
    assert len(problems) == 1
    message = str(problems[0])
    assert phrase in message
    assert (
        f"{path}:{text.splitlines().index('    approve_with: approve_button  # here') + 1}"
        in message
    )
    assert "step 'Ask'" in message
    assert "key 'approve_with'" in message


def test_gpio_params_of_a_branch_step_are_checked(tmp_path: Path) -> None:
    err, path, line = refused(
        tmp_path,
        """  - name: Both
    type: PARALLEL
    branches:
      - - name: Read
          function: hardware.steps.read_input
          params:
            device: level
            field: no_such_field  # <-- error
      - [{name: Y, function: $S.do}]
""",
    )
    assert f"{path}:{line}" in str(err)
    assert err.step == "Read"
    assert err.key == "field"


def test_devices_of_a_branch_step_are_checked_against_the_board(tmp_path: Path) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from agent._definition import load_definition_and_node
    from agent._validate import check_against_config

    path = tmp_path / "beds.yaml"
    text = (
        HEAD
        + """  - name: Both
    type: PARALLEL
    branches:
      - - name: Open_A
          function: hardware.steps.set_output
          params: {device: valve_x, value: true}  # here
      - [{name: Y, function: tests.flows.core.steps.do}]
"""
    )
    path.write_text(text, encoding="utf-8")
    definition, node = load_definition_and_node(path)
    config = SimpleNamespace(
        hardware=SimpleNamespace(devices={"valve_a": SimpleNamespace(kind="output")})
    )
    problems = check_against_config(definition, cast(Any, config), node)
    assert len(problems) == 1
    line = next(i + 1 for i, t in enumerate(text.splitlines()) if t.endswith("# here"))
    assert f"{path}:{line}" in str(problems[0])
    assert problems[0].step == "Open_A"
    assert "'valve_x' is not in the agent config" in str(problems[0])
