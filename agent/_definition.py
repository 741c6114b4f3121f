"""Workflow definitions: YAML parsed into pydantic models, every dotted path imported and checked."""

# No `from __future__ import annotations` here: pydantic would have to evaluate each field's
# annotation from its text (compiling it) when the models are built, at every start of the agent.

import hashlib
import importlib
import inspect
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent._clock import MAX_UNTIL_LENGTH, parse_until
from agent._context import _Frozen
from agent._errors import DefinitionError
from hardware._yaml import DEFAULT_YAML_LIMITS as DEFAULT_YAML_LIMITS
from hardware._yaml import YamlLimits as YamlLimits
from hardware._yaml import YamlRefused as YamlRefused
from hardware._yaml import read_yaml_text as read_yaml_text
from hardware._yaml import safe_load_yaml as safe_load_yaml
from hardware._yaml import yaml_problem as yaml_problem

StepType = Literal["STANDARD", "DECISION", "HUMAN_INPUT", "DELAY", "PARALLEL"]
#: Step types this version can execute; the others are reserved by the schema for later versions.
SUPPORTED_STEP_TYPES = frozenset({"STANDARD", "DECISION", "HUMAN_INPUT", "PARALLEL", "DELAY"})
#: The longest DELAY ``duration`` accepted: a year, in seconds.
MAX_DELAY_SECONDS = 366 * 24 * 3600.0
#: A ``next``, ``routes`` or ``default`` target that ends the workflow (COMPLETED).
END = "END"


class RetryPolicy(BaseModel):
    """How often a step (or compensation) that raises is tried, and how long to wait in between."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(1, ge=1, le=1000, description="Attempts in all (1: no retry).")
    initial_delay: float = Field(0.5, ge=0, description="Seconds after the first failure.")
    multiplier: float = Field(2.0, ge=1, description="Each further delay is this times longer.")
    max_delay: float = Field(30.0, ge=0, description="The longest delay, in seconds.")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1-based)."""
        exponent = max(0, failures - 1)
        raw = self.initial_delay * math.pow(self.multiplier, min(exponent, 64))
        return min(self.max_delay, raw)


DEFAULT_COMPENSATE_RETRY = RetryPolicy(max_attempts=3)


class StepDefinition(BaseModel):
    """One step of a workflow, as written in YAML (which keys each ``type`` takes: see
    :data:`STEP_KEYS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=200, description="Unique across the workflow, branches included."
    )
    type: StepType = Field(
        "STANDARD", description="STANDARD (default), DECISION, HUMAN_INPUT, PARALLEL, DELAY."
    )
    function: str | None = Field(
        None,
        min_length=1,
        description="Dotted path of f(state, context, **params); a DECISION's returns a route key.",
    )
    compensate_function: str | None = Field(
        None, description="Dotted path of the step's undo, run by a saga rollback."
    )
    automate_next: bool = Field(
        False, description="next_step() goes straight on into the next step."
    )
    # Factories are lambdas, not the builtins dict/list: pydantic inspects a factory's signature,
    # and for a builtin that means tokenizing its text signature (milliseconds at start-up).
    params: dict[str, Any] = Field(
        default_factory=lambda: {}, description="Keyword arguments of function and compensation."
    )
    retry: RetryPolicy = Field(RetryPolicy(), description="Attempts of a step that raises.")
    compensate_retry: RetryPolicy = Field(
        DEFAULT_COMPENSATE_RETRY, description="Attempts of a compensation that raises."
    )
    max_interrupts: int = Field(
        3, ge=1, le=1000, description="Executions cut short by the agent dying before it gives up."
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds: of an attempt, or (HUMAN_INPUT) of the wait for input."
    )
    description: str | None = Field(None, description="Free text.")
    next: str | None = Field(
        None,
        min_length=1,
        description="The step that follows (default: the next in the list); END ends.",
    )
    routes: dict[str, str] | None = Field(
        None, description="DECISION: route key -> step name or END."
    )
    default: str | None = Field(
        None, min_length=1, description="DECISION: the target of None or of an unknown route key."
    )
    input_model: str | None = Field(
        None,
        min_length=1,
        description="HUMAN_INPUT: dotted path of the pydantic model of the input.",
    )
    on_timeout: Literal["fail", "continue"] = Field(
        "fail", description="HUMAN_INPUT: fail the step, or continue with the model's defaults."
    )
    approve_with: str | None = Field(
        None, min_length=1, description="HUMAN_INPUT: a button/input device whose press resumes it."
    )
    branches: list[list["StepDefinition"]] | None = Field(
        None,
        description="PARALLEL: lists of STANDARD or DELAY steps; the lists run concurrently.",
    )
    pivot: bool = Field(False, description="The point of no return of a saga (see the docs).")
    duration: float | None = Field(
        None, ge=0, le=MAX_DELAY_SECONDS, description="DELAY: seconds to wait (or give until)."
    )
    until: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_UNTIL_LENGTH,
        description='DELAY: wait until a time of day ("06:30") or an ISO-8601 date and time.',
    )
    timezone: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="DELAY: the zone of until (default: the board's local zone).",
    )
    max_lateness: float | None = Field(
        None,
        gt=0,
        le=MAX_DELAY_SECONDS,
        description="Seconds after the step before it finished beyond which it fails unrun.",
    )
    on_late: Literal["run", "fail"] = Field(
        "run", description="DELAY: its time passed while the agent was down: run (go on) or fail."
    )


class WorkflowDefinition(BaseModel):
    """A whole workflow definition, as written in YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workflow_type: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="The registry key a start command names.",
    )
    workflow_version: str = Field(min_length=1, description="The definition's version, as text.")
    initial_state_model: str = Field(
        min_length=1, description="Dotted path of the pydantic model of the state."
    )
    description: str | None = Field(None, description="Free text.")
    saga_mode: bool = Field(False, description="A failure compensates the completed steps.")
    resources: list[str] = Field(  # a lambda: see StepDefinition
        default_factory=lambda: [], description="Devices the workflow holds while it runs."
    )
    steps: list[StepDefinition] = Field(min_length=1, description="The steps, in order.")
    on_restart: Literal["rollback", "restore", "resume"] | None = Field(
        None,
        description=(
            "What recovery does with a workflow that was ACTIVE when the agent stopped (its "
            "outputs were set safe at start): rollback (the default with resources) compensates "
            "at once; restore drives its outputs back to what its completed steps commanded, then "
            "goes on; resume (the default otherwise) goes on."
        ),
    )

    @property
    def restart_rule(self) -> Literal["rollback", "restore", "resume"]:
        """``on_restart``, or its default: rollback with ``resources``, else resume."""
        if self.on_restart is not None:
            return self.on_restart
        return "rollback" if self.resources else "resume"

    @field_validator("workflow_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `workflow_version: 1.0` in YAML is a float; keep what the user wrote as text.
        return str(value) if isinstance(value, int | float) else value


class LoadedStep(_Frozen):
    """A step with its functions (and a HUMAN_INPUT's input model, a PARALLEL's branches)
    imported. ``function`` is None for a HUMAN_INPUT and a PARALLEL step."""

    __match_args__ = ("spec", "function", "compensate", "input_model", "branches")
    __slots__ = __match_args__

    spec: StepDefinition
    function: Callable[..., Any] | None
    compensate: Callable[..., Any] | None
    input_model: type[BaseModel] | None
    branches: tuple[tuple["LoadedStep", ...], ...]

    def __init__(
        self,
        spec: StepDefinition,
        function: Callable[..., Any] | None,
        compensate: Callable[..., Any] | None,
        input_model: type[BaseModel] | None = None,
        branches: tuple[tuple["LoadedStep", ...], ...] = (),
    ) -> None:
        self._init(spec, function, compensate, input_model, branches)

    @property
    def name(self) -> str:
        return self.spec.name


class LoadedDefinition(_Frozen):
    """A validated definition with every dotted path resolved.

    ``snapshot`` is the canonical JSON stored with each instance; ``hash`` its SHA-256.
    """

    __match_args__ = ("spec", "state_model", "steps", "source", "snapshot", "hash")
    __slots__ = __match_args__

    spec: WorkflowDefinition
    state_model: type[BaseModel]
    steps: tuple[LoadedStep, ...]
    source: str
    snapshot: str
    hash: str

    def __init__(
        self,
        spec: WorkflowDefinition,
        state_model: type[BaseModel],
        steps: tuple[LoadedStep, ...],
        source: str,
        snapshot: str,
        hash: str,
    ) -> None:
        self._init(spec, state_model, steps, source, snapshot, hash)

    @property
    def workflow_type(self) -> str:
        return self.spec.workflow_type

    @property
    def version(self) -> str:
        return self.spec.workflow_version

    def step(self, name: str) -> LoadedStep:
        """The step ``name``, a branch step of a PARALLEL included."""
        for step in self.steps:
            if step.name == name:
                return step
        for step in self.steps:
            for branch in step.branches:
                for inner in branch:
                    if inner.name == name:
                        return inner
        raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# YAML with line numbers


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (a pydantic error location), or its parent's."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
            if nxt is None:
                return line
            node, line = nxt, (key or nxt).start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _read_yaml(path: Path, limits: YamlLimits) -> tuple[Any, yaml.Node | None]:
    try:
        text = read_yaml_text(path, limits)
        data, node = safe_load_yaml(text, compose=True, limits=limits)
    except OSError as exc:
        raise DefinitionError(
            f"cannot read the file ({exc.strerror or exc}).", path=str(path)
        ) from exc
    except UnicodeDecodeError as exc:
        raise DefinitionError("the file is not UTF-8 text.", path=str(path)) from exc
    except YamlRefused as exc:
        raise DefinitionError(
            f"{exc.reason}.", path=str(path), key=exc.key, line=exc.line
        ) from None
    except yaml.YAMLError as exc:
        problem, line = yaml_problem(exc)
        raise DefinitionError(
            f"malformed YAML: {problem}. Fix the syntax at that line.", path=str(path), line=line
        ) from exc
    return data, node


def import_dotted(path: str) -> Any:
    """Import ``package.module.attr`` and return the attribute."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path of the form package.module.name")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


class _Placeholder:
    """Stands in for state and context when a step's signature is checked."""


def _check_callable(
    dotted: str, params: dict[str, Any], *, path: str, step: str, key: str, line: int | None
) -> Callable[..., Any]:
    try:
        func = import_dotted(dotted)
    except Exception as exc:  # ImportError, SyntaxError in the step module, ...
        raise DefinitionError(
            f"cannot import {dotted!r}: {exc}. Check the dotted path and that the module is "
            "importable: beside the definitions, in a python_path directory of the agent config, "
            "or installed.",
            path=path,
            step=step,
            key=key,
            line=line,
        ) from exc
    if not callable(func):
        raise DefinitionError(
            f"{dotted!r} is not callable.", path=path, step=step, key=key, line=line
        )
    checked: Callable[..., Any] = func
    try:
        sig = inspect.signature(checked)
    except (TypeError, ValueError):
        return checked  # builtins without a signature: trust them
    try:
        sig.bind(_Placeholder(), _Placeholder(), **params)
    except TypeError as exc:
        raise DefinitionError(
            f"{dotted!r} cannot be called as f(state, context, **params) with params "
            f"{sorted(params)}: {exc}.",
            path=path,
            step=step,
            key=key,
            line=line,
        ) from exc
    return checked


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _spec_error(
    exc: ValidationError, raw: dict[str, Any], source: str, node: yaml.Node | None
) -> DefinitionError:
    """The first of pydantic's problems with a definition, as one sentence with step, key, line."""
    err = exc.errors()[0]
    err_loc = tuple(err["loc"])
    step_name = None
    if len(err_loc) >= 2 and err_loc[0] == "steps" and isinstance(err_loc[1], int):
        raw_steps = raw.get("steps")
        if (
            isinstance(raw_steps, list)
            and err_loc[1] < len(raw_steps)
            and isinstance(raw_steps[err_loc[1]], dict)
        ):
            step_name = raw_steps[err_loc[1]].get("name") or f"#{err_loc[1] + 1}"
        else:
            step_name = f"#{err_loc[1] + 1}"
    key = str(err_loc[-1]) if err_loc and isinstance(err_loc[-1], str) else None
    if err["type"] == "extra_forbidden":
        msg = f"unknown key {key!r}; remove it or fix its spelling"
    elif err["type"] == "literal_error" and key == "type":
        msg = (
            f"unknown step type {err.get('input')!r}; use one of STANDARD, DECISION, "
            "HUMAN_INPUT, DELAY, PARALLEL"
        )
    else:
        msg = err["msg"]
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return DefinitionError(
        f"{msg}{more}.", path=source, step=step_name, key=key, line=_line_of(node, err_loc)
    )


_COMMON_KEYS = frozenset({"name", "type", "description", "max_lateness"})
_RUN_KEYS = frozenset({"function", "params", "retry", "max_interrupts", "timeout", "automate_next"})
#: The keys each step type takes (``name``, ``type`` and ``description`` on every one).
STEP_KEYS: dict[str, frozenset[str]] = {
    "STANDARD": _COMMON_KEYS
    | _RUN_KEYS
    | {"compensate_function", "compensate_retry", "next", "pivot"},
    "DECISION": _COMMON_KEYS | _RUN_KEYS | {"routes", "default", "pivot"},
    "HUMAN_INPUT": _COMMON_KEYS
    | {"input_model", "timeout", "on_timeout", "approve_with", "next", "max_interrupts"},
    "PARALLEL": _COMMON_KEYS | {"branches", "next", "automate_next", "max_interrupts"},
    "DELAY": _COMMON_KEYS | {"duration", "until", "timezone", "on_late", "next"},
}
#: What a step in a PARALLEL's branch takes: a STANDARD step's keys less the ones of the path.
BRANCH_STEP_KEYS = STEP_KEYS["STANDARD"] - {"next", "pivot", "max_lateness"}
#: What a DELAY in a PARALLEL's branch takes: a DELAY's keys less the ones of the path.
BRANCH_DELAY_KEYS = STEP_KEYS["DELAY"] - {"next", "max_lateness"}
#: The step types a PARALLEL's branch holds.
BRANCH_STEP_TYPES = frozenset({"STANDARD", "DELAY"})


class _Where:
    """Where a step sits in the file: for the file, line, step and key of an error."""

    __slots__ = ("loc", "node", "source", "step")

    def __init__(
        self, source: str, node: yaml.Node | None, step: str, loc: tuple[int | str, ...]
    ) -> None:
        self.source, self.node, self.step, self.loc = source, node, step, loc

    def error(self, message: str, key: str | None, *sub: int | str) -> DefinitionError:
        loc = (*self.loc, key, *sub) if key is not None else self.loc
        return DefinitionError(
            message, path=self.source, step=self.step, key=key, line=_line_of(self.node, loc)
        )


def _check_keys(step: StepDefinition, where: _Where, in_branch: bool) -> None:
    """Refuse a key the step's type does not take, and a missing one it needs."""
    if in_branch and step.type not in BRANCH_STEP_TYPES:
        raise where.error(
            f"a PARALLEL's branch holds STANDARD and DELAY steps only, not a {step.type} step; "
            "move it out of the branch.",
            "type",
        )
    if in_branch and "pivot" in step.model_fields_set:
        raise where.error(
            "a pivot cannot be inside a PARALLEL's branch; make the PARALLEL's neighbour the "
            "pivot instead.",
            "pivot",
        )
    if in_branch:
        allowed = BRANCH_DELAY_KEYS if step.type == "DELAY" else BRANCH_STEP_KEYS
    else:
        allowed = STEP_KEYS[step.type]
    for key in sorted(step.model_fields_set - allowed):
        if in_branch and key in STEP_KEYS[step.type]:
            why = "a step in a PARALLEL's branch runs in list order"
            raise where.error(f"{why} and takes no {key!r}; remove it.", key)
        raise where.error(f"a {step.type} step takes no {key!r}; remove it.", key)
    needs = {"STANDARD": "function", "DECISION": "function", "PARALLEL": "branches"}
    need = needs.get(step.type)
    if need is not None and getattr(step, need) is None:
        raise where.error(f"a {step.type} step needs {need!r}; add it.", None)
    if step.type == "DECISION" and not step.routes:
        raise where.error(
            "a DECISION step needs 'routes' (route key: step name or END); add them.", None
        )
    if step.type == "DELAY":
        _check_delay(step, where)
    if step.type == "PARALLEL":
        branches = step.branches or []
        if len(branches) < 2:
            raise where.error(
                "a PARALLEL step needs at least two branches; for one, write its steps in line.",
                "branches",
            )
        for b, branch in enumerate(branches):
            if not branch:
                raise where.error(
                    f"branch {b + 1} of the PARALLEL step is empty; give it a step or remove it.",
                    "branches",
                    b,
                )


def _check_delay(step: StepDefinition, where: _Where) -> None:
    """A DELAY waits ``duration`` seconds or ``until`` a time, exactly one of them."""
    if (step.duration is None) == (step.until is None):
        raise where.error(
            "a DELAY step needs exactly one of 'duration' (seconds) and 'until' (HH:MM or an "
            "ISO-8601 date and time); give one.",
            None,
        )
    if step.timezone is not None and step.until is None:
        raise where.error("'timezone' goes with 'until' only; remove it.", "timezone")
    if step.until is not None:
        try:
            parse_until(step.until)
        except ValueError as exc:
            raise where.error(str(exc).rstrip("."), "until") from None
    if step.timezone is not None:
        try:
            ZoneInfo(step.timezone)
        except (ValueError, KeyError, OSError):
            raise where.error(
                f"unknown time zone {step.timezone!r}; give an IANA name such as Europe/Berlin",
                "timezone",
            ) from None


def _load_step(
    step: StepDefinition,
    where: _Where,
    seen: set[str],
    in_branch: bool = False,
) -> LoadedStep:
    """One step with its function and compensation imported and their signatures checked."""
    if step.name in seen:
        raise where.error(
            "duplicate step name; step names must be unique within a workflow (its PARALLEL "
            "branches included).",
            "name",
        )
    seen.add(step.name)
    _check_keys(step, where, in_branch)
    func = comp = None
    if step.function is not None:
        func = _check_callable(
            step.function,
            step.params,
            path=where.source,
            step=step.name,
            key="function",
            line=_line_of(where.node, (*where.loc, "function")),
        )
    if step.compensate_function:
        comp = _check_callable(
            step.compensate_function,
            step.params,
            path=where.source,
            step=step.name,
            key="compensate_function",
            line=_line_of(where.node, (*where.loc, "compensate_function")),
        )
    branches: list[tuple[LoadedStep, ...]] = []
    for b, branch in enumerate(step.branches or []):
        inner = tuple(
            _load_step(
                s,
                _Where(where.source, where.node, s.name, (*where.loc, "branches", b, j)),
                seen,
                True,
            )
            for j, s in enumerate(branch)
        )
        branches.append(inner)
    return LoadedStep(spec=step, function=func, compensate=comp, branches=tuple(branches))


def _load_steps(
    spec: WorkflowDefinition, source: str, node: yaml.Node | None
) -> tuple[LoadedStep, ...]:
    """Every step with its function and compensation imported and their signatures checked."""
    seen: set[str] = set()
    return tuple(
        _load_step(step, _Where(source, node, step.name, ("steps", index)), seen)
        for index, step in enumerate(spec.steps)
    )


# --------------------------------------------------------------------------------------------------
# The path: routes, reachability, cycles, the pivot, input models


def _edges(steps: Sequence[LoadedStep]) -> dict[str, list[tuple[str, str | None, str | None]]]:
    """Each outer step's successors as ``(target, key, route)``: ``key`` is the YAML key that names
    the target (None: the list order), ``route`` the route key of a DECISION's route."""
    out: dict[str, list[tuple[str, str | None, str | None]]] = {}
    for i, step in enumerate(steps):
        spec = step.spec
        edges: list[tuple[str, str | None, str | None]] = []
        if spec.type == "DECISION":
            edges.extend((t, "routes", k) for k, t in (spec.routes or {}).items())
            if spec.default is not None:
                edges.append((spec.default, "default", None))
        elif spec.next is not None:
            edges.append((spec.next, "next", None))
        elif i + 1 < len(steps):
            edges.append((steps[i + 1].name, None, None))
        out[step.name] = edges
    return out


def _check_targets(
    steps: Sequence[LoadedStep], edges: dict[str, list[Any]], where: dict[str, _Where]
) -> None:
    outer = [s.name for s in steps]
    inner = {b.name for s in steps for branch in s.branches for b in branch}
    for name, targets in edges.items():
        for target, key, route in targets:
            if key is None or target == END or target in edges:
                continue
            sub = () if route is None else (route,)
            if target in inner:
                raise where[name].error(
                    f"{key} names {target!r}, a step inside a PARALLEL's branch; a route can "
                    "only go to a step of the outer path (or END).",
                    key,
                    *sub,
                )
            raise where[name].error(
                f"{key} names {target!r}, which is no step of this workflow (steps: "
                f"{', '.join(outer)}); use a step name or END.",
                key,
                *sub,
            )


def _check_cycles(edges: dict[str, list[Any]], where: dict[str, _Where]) -> None:
    """Refuse a cycle, naming it ("A → B → A"), at the step whose key closes it."""
    colour: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        colour[name] = 1
        path.append(name)
        for target, _key, _route in edges[name]:
            if target == END:
                continue
            if colour.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise _cycle_error(cycle, edges, where)
            if target not in colour:
                visit(target)
        path.pop()
        colour[name] = 2

    for name in edges:
        if name not in colour:
            visit(name)


def _cycle_error(
    cycle: list[str], edges: dict[str, list[Any]], where: dict[str, _Where]
) -> DefinitionError:
    # The list order alone never loops: some key of the cycle names a step back; blame the last.
    at, key, route = cycle[-2], None, None
    for a, b in itertools.pairwise(cycle):
        for target, k, r in edges[a]:
            if target == b and k is not None:
                at, key, route = a, k, r
    sub = () if route is None else (route,)
    return where[at].error(
        f"the steps form a cycle {' → '.join(cycle)}; loops are not supported: use retry or a "
        "schedule.",
        key,
        *sub,
    )


def _check_reachable(
    steps: Sequence[LoadedStep], edges: dict[str, list[Any]], where: dict[str, _Where]
) -> None:
    first = steps[0].name
    seen = {first}
    todo = [first]
    while todo:
        for target, _key, _route in edges[todo.pop()]:
            if target != END and target not in seen:
                seen.add(target)
                todo.append(target)
    for step in steps:
        if step.name not in seen:
            raise where[step.name].error(
                f"step is unreachable: no next, routes or default leads to it from the first "
                f"step {first!r}; route to it or remove it.",
                "name",
            )


def _closure(start: str, edges: dict[str, list[Any]]) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target, _key, _route in edges[todo.pop()]:
            if target != END and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _check_pivot(
    steps: Sequence[LoadedStep], edges: dict[str, list[Any]], where: dict[str, _Where]
) -> None:
    """Every step that can run before the pivot can be undone; every one after must succeed."""
    pivots = [s for s in steps if s.spec.pivot]
    if not pivots:
        return
    if len(pivots) > 1:
        raise where[pivots[1].name].error(
            f"only one step can be the pivot, and {pivots[0].name!r} already is; remove one.",
            "pivot",
        )
    pivot = pivots[0].name
    after = _closure(pivot, edges)
    before = {s.name for s in steps if pivot in _closure(s.name, edges)}
    for step in steps:
        if step.name == pivot or (
            step.spec.type in ("DECISION", "HUMAN_INPUT") and step.name in before
        ):
            continue
        for inner, w in _with_branches(step, where):
            if inner.spec.type == "DELAY":
                continue  # it changes nothing to undo, and `retry` makes it wait again
            if step.name in before and inner.compensate is None:
                raise w.error(
                    f"step runs before the pivot {pivot!r} but has no compensate_function; every "
                    "step before the pivot must be undoable, so add one.",
                    "compensate_function",
                )
            if step.name in after and inner.spec.type != "HUMAN_INPUT":
                if inner.compensate is not None:
                    raise w.error(
                        f"step runs after the pivot {pivot!r}, which is never rolled back, so it "
                        "takes no compensate_function; remove it.",
                        "compensate_function",
                    )
                if inner.spec.retry.max_attempts <= 1:
                    raise w.error(
                        f"step runs after the pivot {pivot!r} and must eventually succeed; give "
                        "it retry.max_attempts greater than 1.",
                        "retry",
                    )


def _with_branches(step: LoadedStep, where: dict[str, _Where]) -> list[tuple[LoadedStep, _Where]]:
    if step.spec.type != "PARALLEL":
        return [(step, where[step.name])]
    return [(inner, where[inner.name]) for branch in step.branches for inner in branch]


def _compatible(given: Any, wanted: Any) -> bool:
    """May a value of the input model's field type go into a state field of type ``wanted``?"""
    if given == wanted or wanted is Any or wanted is object:
        return True
    if isinstance(given, type) and isinstance(wanted, type):
        try:
            return issubclass(given, wanted)
        except TypeError:
            return False
    options = getattr(wanted, "__args__", None)
    if options and type(wanted).__name__ in ("UnionType", "_UnionGenericAlias"):
        given_options = (
            getattr(given, "__args__", None)
            if type(given).__name__
            in (
                "UnionType",
                "_UnionGenericAlias",
            )
            else (given,)
        )
        return all(any(_compatible(g, w) for w in options) for g in given_options or ())
    return False


def _load_input_model(step: LoadedStep, state_model: type[BaseModel], w: _Where) -> LoadedStep:
    dotted = step.spec.input_model
    if dotted is None:
        return step
    try:
        model = import_dotted(dotted)
    except Exception as exc:
        raise w.error(f"cannot import the input model {dotted!r}: {exc}.", "input_model") from exc
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise w.error(f"{dotted!r} is not a pydantic BaseModel subclass.", "input_model")
    fields = state_model.model_fields
    for name, field in model.model_fields.items():
        if name not in fields:
            raise w.error(
                f"the input model's field {name!r} is not a field of the state model "
                f"{state_model.__name__}; add it to the state model or rename it.",
                "input_model",
            )
        if not _compatible(field.annotation, fields[name].annotation):
            raise w.error(
                f"the input model's field {name!r} is {_type_text(field.annotation)}, but the "
                f"state model's is {_type_text(fields[name].annotation)}; make them the same.",
                "input_model",
            )
    return LoadedStep(step.spec, step.function, step.compensate, model, step.branches)


def _type_text(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_flow(
    steps: tuple[LoadedStep, ...],
    state_model: type[BaseModel],
    source: str,
    node: yaml.Node | None,
) -> tuple[LoadedStep, ...]:
    """The path checks (targets, cycles, reachability, the pivot) and the input models; returns
    the steps with their input models imported. A plain list of STANDARD steps costs a loop."""
    where: dict[str, _Where] = {}
    for i, step in enumerate(steps):
        where[step.name] = _Where(source, node, step.name, ("steps", i))
        for b, branch in enumerate(step.branches):
            for j, inner in enumerate(branch):
                where[inner.name] = _Where(source, node, inner.name, ("steps", i, "branches", b, j))
    edges = _edges(steps)
    _check_targets(steps, edges, where)
    _check_cycles(edges, where)
    _check_reachable(steps, edges, where)
    _check_pivot(steps, edges, where)
    return tuple(_load_input_model(s, state_model, where[s.name]) for s in steps)


def _load_state_model(
    spec: WorkflowDefinition, source: str, node: yaml.Node | None
) -> type[BaseModel]:
    """The state model the definition names, imported and checked to be a pydantic model."""
    try:
        model = import_dotted(spec.initial_state_model)
    except Exception as exc:
        raise DefinitionError(
            f"cannot import the state model {spec.initial_state_model!r}: {exc}.",
            path=source,
            key="initial_state_model",
            line=_line_of(node, ("initial_state_model",)),
        ) from exc
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise DefinitionError(
            f"{spec.initial_state_model!r} is not a pydantic BaseModel subclass.",
            path=source,
            key="initial_state_model",
            line=_line_of(node, ("initial_state_model",)),
        )
    return model


def build_definition(raw: Any, *, source: str, node: yaml.Node | None = None) -> LoadedDefinition:
    """Validate ``raw`` (parsed YAML or a stored snapshot) and import every dotted path."""
    if not isinstance(raw, dict):
        raise DefinitionError(
            "a workflow definition must be a YAML mapping with workflow_type, steps, ...",
            path=source,
            line=_line_of(node, ()),
        )
    try:
        spec = WorkflowDefinition.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, raw, source, node) from None
    steps = _load_steps(spec, source, node)
    model = _load_state_model(spec, source, node)
    steps = _check_flow(steps, model, source, node)
    # Only what differs from the defaults: compact, and a step keeps only the keys its type takes.
    snapshot = canonical_json(spec.model_dump(mode="json", exclude_defaults=True))
    digest = hashlib.sha256(snapshot.encode()).hexdigest()
    return LoadedDefinition(
        spec=spec,
        state_model=model,
        steps=steps,
        source=source,
        snapshot=snapshot,
        hash=digest,
    )


def load_definition(
    path: str | Path, *, limits: YamlLimits = DEFAULT_YAML_LIMITS
) -> LoadedDefinition:
    """Load one YAML definition file; raise :class:`DefinitionError` naming file, step and key.

    Beyond :func:`build_definition`, the params of the bundled GPIO steps are checked against the
    state model (see :func:`check_gpio_steps`): what would otherwise fail only when the step runs."""
    return load_definition_and_node(path, limits=limits)[0]


def load_definition_and_node(
    path: str | Path, *, limits: YamlLimits = DEFAULT_YAML_LIMITS
) -> tuple[LoadedDefinition, yaml.Node | None]:
    """:func:`load_definition`, and the file's YAML node tree (for the lines of later checks)."""
    p = Path(path)
    data, node = _read_yaml(p, limits)
    definition = build_definition(data, source=str(p), node=node)
    check_gpio_steps(definition, node)
    return definition, node


#: Their params that name a state field the step writes.
_FIELD_PARAMS = ("field", "elapsed_field")
#: Their params that must be a number of seconds, 0 or more (None allowed for ``timeout``).
_SECONDS_PARAMS = ("seconds", "timeout")


def steps_with_locations(
    definition: LoadedDefinition,
) -> list[tuple[LoadedStep, tuple[int | str, ...]]]:
    """Every step, a PARALLEL's branch steps included (after it), with its YAML location (for
    :func:`_line_of`): ``("steps", i)`` or ``("steps", i, "branches", b, j)``."""
    out: list[tuple[LoadedStep, tuple[int | str, ...]]] = []
    for i, step in enumerate(definition.steps):
        out.append((step, ("steps", i)))
        for b, branch in enumerate(step.branches):
            out.extend((inner, ("steps", i, "branches", b, j)) for j, inner in enumerate(branch))
    return out


def gpio_step_name(func: Callable[..., Any] | None) -> str | None:
    """``set_output`` for ``hardware.steps.set_output`` (and so on), None for any other callable."""
    if func is None or getattr(func, "__module__", None) != "hardware.steps":
        return None
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else None


def check_gpio_steps(definition: LoadedDefinition, node: yaml.Node | None = None) -> None:
    """Raise :class:`DefinitionError` for a bundled GPIO step whose params cannot work with the
    workflow's state model: a ``field``/``elapsed_field`` naming a field the model lacks, or
    ``seconds``/``timeout`` that is not a number of seconds. (What a step commands is kept in the
    journal, not in the state: any state model will do for the others.) (Device names need the agent config:
    see :mod:`agent._validate`.)"""
    fields = definition.state_model.model_fields
    for step, loc in steps_with_locations(definition):
        gpio = gpio_step_name(step.function)
        if gpio is None:
            continue
        where: dict[str, Any] = {"path": definition.source, "step": step.name}
        params = step.spec.params
        for key in _FIELD_PARAMS:
            name = params.get(key)
            if name is not None and name not in fields:
                raise DefinitionError(
                    f"{key} names the state field {name!r}, but the state model "
                    f"{definition.spec.initial_state_model} has no field {name!r}; add it to the "
                    "model or fix the param.",
                    key=key,
                    line=_line_of(node, (*loc, "params", key)),
                    **where,
                )
        for key in _SECONDS_PARAMS:
            if key not in params or (params[key] is None and gpio not in ("pulse", "run_for")):
                continue  # None: no timeout (wait_for_input), or unused (the compensations)
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise DefinitionError(
                    f"{key} must be a number of seconds (0 or more), not {value!r}.",
                    key=key,
                    line=_line_of(node, (*loc, "params", key)),
                    **where,
                )


def _is_workflow_file(path: Path) -> bool:
    """In a directory scan, only YAML files with a top-level ``workflow_type`` are definitions
    (device maps and agent configs may live beside them)."""
    try:
        if path.stat().st_size > DEFAULT_YAML_LIMITS.max_bytes:
            return True  # let load_definition refuse it, rather than read it through
        with path.open(encoding="utf-8") as fh:
            return any(line.startswith("workflow_type:") for line in fh)
    except (OSError, UnicodeDecodeError):
        return True  # let load_definition report it


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (searched recursively for *.yaml / *.yml) into definition files."""
    found: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            for f in sorted([*p.rglob("*.yaml"), *p.rglob("*.yml")]):
                if f.is_file() and _is_workflow_file(f):
                    found.append(f)
        elif p.exists():
            found.append(p)
        else:
            raise DefinitionError(
                "no such file or directory; check the definition path.", path=str(p)
            )
    return found
