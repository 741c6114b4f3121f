"""`edgesaga graph`: Mermaid flowcharts of the bundled workflows, checked by a structural parser
(no renderer), and an instance graph of a failed saga run marking the failed and compensated
steps."""

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent._cli import main
from agent._definition import WorkflowDefinition
from agent._graph import escape, mermaid

_ID = r"[A-Za-z_][A-Za-z0-9_]*"
_LABEL = r'"[^"]*"'
_SHAPES = {  # a node definition: id and one of the shapes, label in quotes
    "rect": rf"({_ID})\[{_LABEL}\]",
    "rhombus": rf"({_ID})\{{{_LABEL}\}}",
    "hexagon": rf"({_ID})\{{\{{{_LABEL}\}}\}}",
    "parallelogram": rf"({_ID})\[/{_LABEL}/\]",
    "stadium": rf"({_ID})\(\[{_LABEL}\]\)",
    "circle": rf"({_ID})\(\({_LABEL}\)\)",
}
_EDGE = re.compile(rf"({_ID}) (-->|-\.->)(?:\|({_LABEL})\|)? ({_ID})")
_SUBGRAPH = re.compile(rf"subgraph ({_ID}) \[{_LABEL}\]")
_CLASSDEF = re.compile(rf"classDef ({_ID}) [a-z-]+:[^,;]+(?:,[a-z-]+:[^,;]+)*")
_CLASS = re.compile(rf"class ({_ID}(?:,{_ID})*) ({_ID})")


@dataclass
class Chart:
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (shape, line)
    edges: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    class_defs: set[str] = field(default_factory=set)
    classes: dict[str, set[str]] = field(default_factory=dict)  # class -> node ids
    subgraphs: list[str] = field(default_factory=list)

    def label(self, node: str) -> str:
        return re.findall(_LABEL, self.nodes[node][1])[0].strip('"')

    def node_by_label(self, text: str) -> str:
        found = [n for n in self.nodes if self.label(n).split("<br/>")[0] == text]
        assert len(found) == 1, (text, found)
        return found[0]


def parse(text: str) -> Chart:
    """The chart, or an AssertionError naming the first line of a shape it does not know."""
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    chart, depth = Chart(), 0
    for line in (raw.strip() for raw in lines[1:]):
        if m := _SUBGRAPH.fullmatch(line):
            chart.subgraphs.append(m.group(1))
            depth += 1
        elif line == "end":
            assert depth > 0, "an end without a subgraph"
            depth -= 1
        elif m := _EDGE.fullmatch(line):
            label = m.group(3).strip('"') if m.group(3) else None
            chart.edges.append((m.group(1), m.group(2), m.group(4), label))
        elif m := _CLASSDEF.fullmatch(line):
            chart.class_defs.add(m.group(1))
        elif m := _CLASS.fullmatch(line):
            chart.classes.setdefault(m.group(2), set()).update(m.group(1).split(","))
        else:
            shape = next((s for s, rx in _SHAPES.items() if re.fullmatch(rx, line)), None)
            assert shape is not None, f"unknown line shape: {line!r}"
            node = re.match(_ID, line)
            assert node is not None
            assert node.group(0) not in chart.nodes, f"defined twice: {line}"
            chart.nodes[node.group(0)] = (shape, line)
    assert depth == 0, "a subgraph is not closed"
    for a, _arrow, b, _label in chart.edges:
        assert a in chart.nodes, f"edge {a} -> {b} from an undefined node"
        assert b in chart.nodes, f"edge {a} -> {b} to an undefined node"
    for cls, nodes in chart.classes.items():
        assert cls in chart.class_defs, f"class {cls} has no classDef"
        assert nodes <= set(chart.nodes), f"class {cls} marks undefined nodes"
    return chart


def graph(capsys: pytest.CaptureFixture[str], *args: str) -> Chart:
    assert main(["graph", *args]) == 0
    return parse(capsys.readouterr().out)


PAYMENT_STEPS = ["Create_Order", "Charge_Payment", "Reserve_Inventory", "Create_Shipment"]
UNDO = {
    "Create_Order": "cancel_order",
    "Charge_Payment": "refund_payment",
    "Reserve_Inventory": "release_inventory",
    "Create_Shipment": "cancel_shipment",
}


def _dashed(chart: Chart) -> dict[str, str]:
    """Step label -> compensation label, for each dashed edge."""
    return {chart.label(a): chart.label(b) for a, arrow, b, _ in chart.edges if arrow == "-.->"}


def test_payment_graph_names_the_steps_and_their_compensations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    chart = graph(capsys, "PaymentProcessing")
    ids = [chart.node_by_label(name) for name in PAYMENT_STEPS]
    end = chart.node_by_label("END")
    solid = [(a, b) for a, arrow, b, _ in chart.edges if arrow == "-->"]
    assert solid == [*itertools.pairwise(ids), (ids[-1], end)]
    # Every step of the payment saga has an undo, so each has its dashed edge (the three the
    # issue counts are the ones a Create_Shipment failure runs: see the instance test).
    assert _dashed(chart) == {step: f"undo: {undo}" for step, undo in UNDO.items()}
    assert "failed" not in chart.classes
    assert "compensated" not in chart.classes


def test_instance_graph_marks_the_failed_and_the_compensated_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "edgesaga.db")
    data = {"order_id": "A1", "customer_id": "C1", "amount": 9.5, "fail_step": "Create_Shipment"}
    start = ["start", "PaymentProcessing", "--saga", "--id", "wf-1", "--db", db]
    assert main([*start, "--data", json.dumps(data)]) == 3  # FAILED_ROLLED_BACK
    capsys.readouterr()
    chart = graph(capsys, "PaymentProcessing", "--instance", "wf-1", "--db", db)
    by_class = {c: {chart.label(n) for n in nodes} for c, nodes in chart.classes.items()}
    assert by_class["failed"] == {"Create_Shipment"}
    assert by_class["compensated"] == {"Create_Order", "Charge_Payment", "Reserve_Inventory"}
    assert "ran" not in by_class  # every step that ran was rolled back
    assert "compensation_failed" not in by_class


def test_instance_graph_of_a_completed_run_marks_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "edgesaga.db")
    data = {"order_id": "A1", "customer_id": "C1", "amount": 9.5}
    start = ["start", "PaymentProcessing", "--saga", "--id", "wf-2", "--db", db]
    assert main([*start, "--data", json.dumps(data)]) == 0
    capsys.readouterr()
    chart = graph(capsys, "PaymentProcessing", "--instance", "wf-2", "--db", db)
    assert {chart.label(n) for n in chart.classes["ran"]} == set(PAYMENT_STEPS)
    assert "failed" not in chart.classes


def test_instance_of_another_type_is_refused_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "edgesaga.db")
    data = {"order_id": "A1", "customer_id": "C1", "amount": 9.5}
    assert (
        main(["start", "PaymentProcessing", "--id", "wf-3", "--db", db, "--data", json.dumps(data)])
        == 0
    )
    capsys.readouterr()
    assert main(["graph", "TwoBeds", "--instance", "wf-3", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "is a PaymentProcessing, not a TwoBeds" in err
    assert "Traceback" not in err


def test_unknown_type_is_refused_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "NoSuchType"]) == 2
    err = capsys.readouterr().err
    assert "No workflow type 'NoSuchType'" in err
    assert "PaymentProcessing" in err


def test_decision_graph_labels_its_routes(capsys: pytest.CaptureFixture[str]) -> None:
    chart = graph(capsys, "SoilIrrigation")
    check = chart.node_by_label("Check_Soil")
    assert chart.nodes[check][0] == "rhombus"
    routes = {label: chart.label(b) for a, _, b, label in chart.edges if a == check}
    assert routes == {"dry": "Open_Valve", "wet": "END"}


def test_parallel_graph_forks_into_branches_and_joins(capsys: pytest.CaptureFixture[str]) -> None:
    chart = graph(capsys, "TwoBeds")
    fork = chart.node_by_label("Open_Beds")
    assert chart.nodes[fork][0] == "hexagon"
    firsts = {chart.label(b) for a, arrow, b, _ in chart.edges if a == fork and arrow == "-->"}
    assert firsts == {"Open_Valve_A", "Open_Valve_B"}
    joins = {
        b
        for a, arrow, b, _ in chart.edges
        if chart.label(a) in ("Open_Valve_A", "Open_Valve_B") and arrow == "-->"
    }
    assert len(joins) == 1
    (join,) = joins
    assert [chart.label(b) for a, _, b, _ in chart.edges if a == join] == ["Wait_For_Level"]
    assert len(chart.subgraphs) == 4  # two branches for each of the two PARALLEL steps
    assert _dashed(chart)["Open_Valve_A"] == "undo: restore_output"


def test_human_input_graph_shows_the_pause(capsys: pytest.CaptureFixture[str]) -> None:
    chart = graph(capsys, "PaymentWithApproval")
    pause = chart.node_by_label("Approve_Refund")
    assert chart.nodes[pause][0] == "parallelogram"
    assert "waits for input" in chart.label(pause)
    before = [chart.label(a) for a, arrow, b, _ in chart.edges if b == pause]
    assert before == ["Charge_Payment"]


def _spec(steps: list[dict[str, object]]) -> WorkflowDefinition:
    return WorkflowDefinition.model_validate(
        {
            "workflow_type": "T",
            "workflow_version": "1",
            "initial_state_model": "m.S",
            "steps": steps,
        }
    )


def test_delay_and_pivot_shapes_and_hostile_names() -> None:
    spec = _spec(
        [
            {"name": 'end "quoted" | <b>', "function": "m.f", "compensate_function": "m.g"},
            {"name": "Wait", "type": "DELAY", "duration": 30},
            {"name": "end", "function": "m.f", "pivot": True, "retry": {"max_attempts": 3}},
            {"name": "end!", "function": "m.f", "retry": {"max_attempts": 3}},
        ]
    )
    chart = parse(mermaid(spec))
    wait = chart.node_by_label("Wait")
    assert chart.nodes[wait][0] == "stadium"
    assert "delay 30 s" in chart.label(wait)
    pivot = chart.node_by_label("end")
    assert chart.classes["pivot"] == {pivot}
    assert "pivot" in chart.label(pivot)
    hostile = chart.node_by_label(escape('end "quoted" | <b>'))
    assert '"' not in chart.label(hostile)
    assert "<b>" not in chart.label(hostile)
    assert len({pivot, hostile, chart.node_by_label("end!")}) == 3  # ids stay distinct
    assert all(n != "end" for n in chart.nodes)  # Mermaid's keyword is never an id


def test_parser_rejects_what_is_not_a_chart() -> None:
    good = 'flowchart TD\n    a["A"]\n    b["B"]\n    a --> b\n'
    assert parse(good).edges == [("a", "-->", "b", None)]
    for bad in (
        good.replace("flowchart TD", "graph LR"),
        good + "    a --> c\n",
        good + "    a ==> b\n",
        good + "    class a nope\n",
        good + '    subgraph x ["X"]\n',
    ):
        with pytest.raises(AssertionError):
            parse(bad)


def test_readme_shows_the_payment_graph_as_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "PaymentProcessing"]) == 0
    printed = capsys.readouterr().out
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"```mermaid\n{printed}```\n" in readme
