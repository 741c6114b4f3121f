"""Workflow definitions: YAML parsed into pydantic models, every dotted path imported and checked."""

# No `from __future__ import annotations` here: pydantic would have to evaluate each field's
# annotation from its text (compiling it) when the models are built, at every start of the agent.

import hashlib
import importlib
import inspect
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
SUPPORTED_STEP_TYPES = frozenset({"STANDARD"})


class RetryPolicy(BaseModel):
    """How often a step (or compensation) that raises is tried, and how long to wait in between."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(1, ge=1, le=1000)
    initial_delay: float = Field(0.5, ge=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay: float = Field(30.0, ge=0)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1-based)."""
        exponent = max(0, failures - 1)
        raw = self.initial_delay * math.pow(self.multiplier, min(exponent, 64))
        return min(self.max_delay, raw)


DEFAULT_COMPENSATE_RETRY = RetryPolicy(max_attempts=3)


class StepDefinition(BaseModel):
    """One step of a workflow, as written in YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    type: StepType = "STANDARD"
    function: str = Field(min_length=1)
    compensate_function: str | None = None
    automate_next: bool = False
    # Factories are lambdas, not the builtins dict/list: pydantic inspects a factory's signature,
    # and for a builtin that means tokenizing its text signature (milliseconds at start-up).
    params: dict[str, Any] = Field(default_factory=lambda: {})
    retry: RetryPolicy = RetryPolicy()
    compensate_retry: RetryPolicy = DEFAULT_COMPENSATE_RETRY
    max_interrupts: int = Field(3, ge=1, le=1000)
    timeout: float | None = Field(None, gt=0)
    description: str | None = None


class WorkflowDefinition(BaseModel):
    """A whole workflow definition, as written in YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workflow_type: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    workflow_version: str = Field(min_length=1)
    initial_state_model: str = Field(min_length=1)
    description: str | None = None
    saga_mode: bool = False
    resources: list[str] = Field(default_factory=lambda: [])  # a lambda: see StepDefinition
    steps: list[StepDefinition] = Field(min_length=1)

    @field_validator("workflow_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `workflow_version: 1.0` in YAML is a float; keep what the user wrote as text.
        return str(value) if isinstance(value, int | float) else value


class LoadedStep(_Frozen):
    """A step with its functions imported."""

    __match_args__ = ("spec", "function", "compensate")
    __slots__ = __match_args__

    spec: StepDefinition
    function: Callable[..., Any]
    compensate: Callable[..., Any] | None

    def __init__(
        self,
        spec: StepDefinition,
        function: Callable[..., Any],
        compensate: Callable[..., Any] | None,
    ) -> None:
        self._init(spec, function, compensate)

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
        for step in self.steps:
            if step.name == name:
                return step
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


def _load_steps(
    spec: WorkflowDefinition, source: str, node: yaml.Node | None
) -> tuple[LoadedStep, ...]:
    """Every step with its function and compensation imported and their signatures checked."""
    seen: set[str] = set()
    steps: list[LoadedStep] = []
    for index, step in enumerate(spec.steps):
        loc: tuple[int | str, ...] = ("steps", index)
        if step.name in seen:
            raise DefinitionError(
                "duplicate step name; step names must be unique within a workflow.",
                path=source,
                step=step.name,
                key="name",
                line=_line_of(node, (*loc, "name")),
            )
        seen.add(step.name)
        if step.type not in SUPPORTED_STEP_TYPES:
            raise DefinitionError(
                f"step type {step.type} is reserved but not supported by this version of "
                "edgesaga; use STANDARD.",
                path=source,
                step=step.name,
                key="type",
                line=_line_of(node, (*loc, "type")),
            )
        func = _check_callable(
            step.function,
            step.params,
            path=source,
            step=step.name,
            key="function",
            line=_line_of(node, (*loc, "function")),
        )
        comp = None
        if step.compensate_function:
            comp = _check_callable(
                step.compensate_function,
                step.params,
                path=source,
                step=step.name,
                key="compensate_function",
                line=_line_of(node, (*loc, "compensate_function")),
            )
        steps.append(LoadedStep(spec=step, function=func, compensate=comp))
    return tuple(steps)


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
    snapshot = canonical_json(spec.model_dump(mode="json"))
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
    for index, step in enumerate(definition.steps):
        gpio = gpio_step_name(step.function)
        if gpio is None:
            continue
        loc: tuple[int | str, ...] = ("steps", index)
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
