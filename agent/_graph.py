"""Mermaid flowcharts of workflow definitions (``edgesaga graph TYPE``), optionally marked with the
path one instance took, the step where it failed and the steps that were compensated."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent._definition import END, StepDefinition, WorkflowDefinition

#: Node class of each mark an instance can leave on a step (``--instance``).
CLASS_DEFS = {
    "pivot": "stroke-width:4px,stroke:#7b1fa2",
    "compensation": "stroke-dasharray:4 3,fill:#fff8e1",
    "ran": "fill:#c8e6c9,stroke:#2e7d32",
    "current": "fill:#bbdefb,stroke:#1565c0",
    "failed": "fill:#ffcdd2,stroke:#c62828,stroke-width:3px",
    "compensated": "fill:#ffe0b2,stroke:#ef6c00",
    "compensation_failed": "fill:#ef9a9a,stroke:#b71c1c,stroke-width:3px",
}
END_ID = "wf_END"


def escape(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label: quotes, angle brackets, pipes and line
    breaks as entity codes (a label cannot end its quotes, open HTML or split the line)."""
    out = text.replace("#", "#35;").replace('"', "#quot;").replace("|", "#124;")
    out = out.replace("<", "#lt;").replace(">", "#gt;").replace("`", "#96;")
    return " ".join(out.split())


class _Ids:
    """Mermaid node ids from step names: letters, digits and underscores, unique, never a
    keyword (``end``, ``graph``, ...) since each carries a prefix."""

    def __init__(self) -> None:
        self._by_name: dict[str, str] = {}
        self._used: set[str] = {END_ID}

    def __call__(self, name: str, suffix: str = "") -> str:
        key = f"{name}\0{suffix}"
        if key not in self._by_name:
            base = "s_" + re.sub(r"[^A-Za-z0-9_]", "_", name) + (f"_{suffix}" if suffix else "")
            node, n = base, 1
            while node in self._used:
                n += 1
                node = f"{base}_{n}"
            self._used.add(node)
            self._by_name[key] = node
        return self._by_name[key]


def _label(step: StepDefinition) -> str:
    extra = {
        "DECISION": "decision",
        "HUMAN_INPUT": "waits for input",
        "PARALLEL": "parallel",
    }.get(step.type)
    if step.type == "DELAY":
        extra = f"delay {step.duration:g} s" if step.duration is not None else f"until {step.until}"
    if step.pivot:
        extra = f"{extra}, pivot" if extra else "pivot"
    text = escape(step.name) + (f"<br/>({escape(extra)})" if extra else "")
    return f'"{text}"'


def _shape(node: str, step: StepDefinition) -> str:
    label = _label(step)
    match step.type:
        case "DECISION":
            return f"{node}{{{label}}}"
        case "HUMAN_INPUT":
            return f"{node}[/{label}/]"
        case "DELAY":
            return f"{node}([{label}])"
        case "PARALLEL":
            return f"{node}{{{{{label}}}}}"
        case _:
            return f"{node}[{label}]"


def _targets(steps: Sequence[StepDefinition], i: int) -> list[tuple[str, str | None]]:
    """Where step ``i`` goes: ``(target, edge label)``; END when it is the last in the list."""
    step = steps[i]
    if step.type == "DECISION":
        out: list[tuple[str, str | None]] = [(t, k) for k, t in (step.routes or {}).items()]
        if step.default is not None:
            out.append((step.default, "default"))
        return out
    if step.next is not None:
        return [(step.next, None)]
    return [(steps[i + 1].name if i + 1 < len(steps) else END, None)]


class _Chart:
    def __init__(self) -> None:
        self.ids = _Ids()
        self.lines: list[str] = []
        self.pivots: list[str] = []
        self.compensations: list[str] = []

    def node(self, step: StepDefinition, node: str, indent: str = "    ") -> None:
        self.lines.append(indent + _shape(node, step))
        if step.pivot:
            self.pivots.append(node)
        if step.compensate_function:
            comp = self.ids(step.name, "undo")
            undo = escape(step.compensate_function.rpartition(".")[2])
            self.lines.append(f'{indent}{comp}["undo: {undo}"]')
            self.compensations.append(f"{node} -.-> {comp}")

    def parallel(self, step: StepDefinition) -> tuple[str, str]:
        """A PARALLEL as a fork node, one subgraph per branch, and a join node."""
        fork, join = self.ids(step.name), self.ids(step.name, "join")
        self.node(step, fork)
        self.lines.append(f'    {join}(("join"))')
        for b, branch in enumerate(step.branches or [], start=1):
            self.lines.append(f'    subgraph {self.ids(step.name, f"branch{b}")} ["branch {b}"]')
            for inner in branch:
                self.node(inner, self.ids(inner.name), "        ")
            self.lines.append("    end")
            chain = [fork, *(self.ids(inner.name) for inner in branch), join]
            self.lines.extend(f"    {a} --> {z}" for a, z in itertools.pairwise(chain))
        return fork, join


def mermaid(spec: WorkflowDefinition, marks: Mapping[str, Iterable[str]] | None = None) -> str:
    """The flowchart (``flowchart TD``) of ``spec``: a node per step shaped by its type, routes
    with their keys as edge labels, END, the pivot, and a dashed edge from each compensable step
    to its compensation. ``marks`` maps a class of :data:`CLASS_DEFS` to step names."""
    chart = _Chart()
    ids = chart.ids
    lines = chart.lines
    lines.append("flowchart TD")
    exits: dict[str, str] = {}  # the node a step's outgoing edges leave from (a PARALLEL's join)
    for step in spec.steps:
        if step.type == "PARALLEL":
            exits[step.name] = chart.parallel(step)[1]
        else:
            chart.node(step, ids(step.name))
            exits[step.name] = ids(step.name)
    lines.append(f'    {END_ID}(("END"))')
    for i, step in enumerate(spec.steps):
        for target, key in _targets(spec.steps, i):
            node = END_ID if target == END else ids(target)
            arrow = "-->" if key is None else f'-->|"{escape(key)}"|'
            lines.append(f"    {exits[step.name]} {arrow} {node}")
    lines.extend(f"    {edge}" for edge in chart.compensations)
    lines.extend(_classes(chart, marks or {}))
    return "\n".join(lines) + "\n"


def _classes(chart: _Chart, marks: Mapping[str, Iterable[str]]) -> list[str]:
    known = set(chart.ids._by_name)
    out = [f"    classDef {name} {style}" for name, style in CLASS_DEFS.items()]
    undo = [edge.split(" -.-> ")[1] for edge in chart.compensations]
    groups = {"pivot": chart.pivots, "compensation": undo}
    for cls, names in marks.items():
        groups[cls] = [chart.ids(n) for n in names if f"{n}\0" in known]
    out.extend(f"    class {','.join(nodes)} {cls}" for cls, nodes in groups.items() if nodes)
    return out


def instance_marks(info: dict[str, Any]) -> dict[str, list[str]]:
    """What the ``get`` reply of one instance marks: the steps it ran, the one it failed at (or
    waits at) and the ones compensated (or whose compensation failed)."""
    last: dict[tuple[str, str], str] = {}
    for entry in info.get("journal") or []:
        last[(entry["step"], entry["phase"])] = entry["outcome"]
    forward = {s: o for (s, p), o in last.items() if p == "forward"}
    undo = {s: o for (s, p), o in last.items() if p == "compensate"}
    current = info.get("current_step")
    marks: dict[str, list[str]] = {
        "ran": sorted(s for s, o in forward.items() if o == "completed" and s not in undo),
        "failed": sorted(s for s, o in forward.items() if o == "failed"),
        "compensated": sorted(s for s, o in undo.items() if o == "completed"),
        "compensation_failed": sorted(s for s, o in undo.items() if o != "completed"),
    }
    marked = {s for names in marks.values() for s in names}
    if current and current not in marked and info.get("status") in ("ACTIVE", "PAUSED"):
        marks["current"] = [current]
    return marks
