"""Checking a set of workflow definitions as the agent would load them, optionally against its config.

``edgesaga validate`` reports what :func:`check_definitions` finds. :func:`load_definitions` is
the same check for the agent's start-up (the first problem raised), so the two cannot disagree
about a file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent._definition import (
    DEFAULT_YAML_LIMITS,
    LoadedDefinition,
    _line_of,
    discover,
    gpio_step_name,
    load_definition_and_node,
    steps_with_locations,
)
from agent._errors import AgentError, DefinitionError
from hardware._errors import with_article

if TYPE_CHECKING:
    import yaml

    from agent._config import AgentConfig
    from agent._engine import WorkflowBuilder
    from agent._schedules import ScheduleConfig

log = logging.getLogger("edgesaga.definitions")

#: What each bundled GPIO step does with its ``device``, and the kinds that allow it.
_DEVICE_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "set_output": (("output", "pwm"), "be set by a step"),
    "restore_output": (("output", "pwm"), "be set by a step"),
    "pulse": (("output", "pwm"), "be set by a step"),
    "safe_output": (("output", "pwm"), "be set by a step"),
    "run_for": (("output", "pwm"), "be set by a step"),
    "stop_output": (("output", "pwm"), "be set by a step"),
    "set_pwm": (("pwm",), "take a duty cycle"),
    "restore_pwm": (("pwm",), "take a duty cycle"),
    "wait_for_input": (("input", "button"), "be waited on"),
    "read_input": (("output", "input", "button", "pwm"), "be read"),
}


class Checked(NamedTuple):
    """What :func:`check_definitions` found, in the order the files were read.

    ``loaded``: the definitions that load (each with its file and whether it is bundled), the
    ones with ``mismatches`` included; ``problems``: files that do not load, which stop the agent;
    ``mismatches``: steps and resources that do not fit the agent config, which fail when they
    run."""

    loaded: list[tuple[Path, LoadedDefinition, bool]]
    problems: list[DefinitionError]
    mismatches: list[DefinitionError]

    def all_problems(self) -> list[DefinitionError]:
        return [*self.problems, *self.mismatches]

    def bad_files(self) -> set[str]:
        return {p.path or "" for p in self.all_problems()}


def python_path(config: AgentConfig | None, paths: Iterable[str | Path] = ()) -> list[Path]:
    """The directories put on ``sys.path`` before definitions load: the config's ``python_path``,
    by default its definitions directories (a definitions file's own directory), then those of
    ``paths`` (what ``edgesaga validate`` was given)."""
    dirs: list[Path] = []
    if config is not None and config.python_path is not None:
        dirs.extend(config.python_path)
        sources: list[Path] = []
    else:
        sources = list(config.definitions) if config is not None else []
    sources.extend(Path(p) for p in paths)
    # A definitions file adds its own directory; a directory (also one not created yet) itself.
    dirs.extend(source.parent if source.is_file() else source for source in sources)
    unique: list[Path] = []
    for directory in dirs:
        resolved = directory.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def add_python_path(directories: Iterable[Path]) -> None:
    """Append ``directories`` to ``sys.path`` (in order), each at most once. Appended, not put in
    front: a module beside the YAML cannot shadow edgesaga's own packages or installed ones."""
    for directory in directories:
        text = str(directory)
        if text not in sys.path:
            sys.path.append(text)


def check_definitions(
    paths: Iterable[str | Path] = (),
    *,
    config: AgentConfig | None = None,
    bundled: Path | None = None,
) -> Checked:
    """Load the bundled definitions (unless the config leaves them out), the config's, then
    ``paths``, as the agent would, and collect every problem instead of stopping at the first:
    a file that does not load, a workflow type defined twice (also when it redefines a bundled
    one), and with a config, steps and ``resources`` naming devices the config does not have.

    ``bundled`` is the directory of the workflows shipped with edgesaga, handed down by the CLI
    and the service (None: there are none to load). A configured definitions directory that does
    not exist yet is a warning in the log, not a problem (see :func:`_configured`).

    The config's ``python_path`` (by default the definitions directories, and those of
    ``paths``) is added to ``sys.path`` first, so custom step modules beside the YAML import."""
    from agent._engine import WorkflowBuilder  # the agent's own registry: the same duplicate rule

    paths = list(paths)
    add_python_path(python_path(config, paths))
    limits = config.yaml_limits if config is not None else DEFAULT_YAML_LIMITS
    problems: list[DefinitionError] = []
    sources: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    groups: list[tuple[list[str | Path], bool]] = []
    if bundled is not None and (config is None or config.include_bundled):
        groups.append(([bundled], True))
    groups.append(([*_configured(config), *paths], False))
    for group, shipped in groups:
        for item in group:
            try:
                found = discover([item])
            except DefinitionError as exc:
                problems.append(exc)
                continue
            for file in found:
                real = file.resolve()
                if real not in seen:
                    seen.add(real)
                    sources.append((file, shipped))

    registry = WorkflowBuilder()
    loaded: list[tuple[Path, LoadedDefinition, bool]] = []
    mismatches: list[DefinitionError] = []
    for file, shipped in sources:
        try:
            definition, node = load_definition_and_node(file, limits=limits)
            registry.add_definition(definition)
        except DefinitionError as exc:
            problems.append(exc)
            continue
        if config is not None and not shipped:
            mismatches.extend(check_against_config(definition, config, node))
        loaded.append((file, definition, shipped))
    if config is not None:
        mismatches.extend(check_schedules(config, registry))
    return Checked(loaded, problems, mismatches)


def check_schedules(config: AgentConfig, registry: WorkflowBuilder) -> list[DefinitionError]:
    """Each of the config's schedules whose ``workflow_type`` is not loaded, or whose ``data``
    does not fit that type's state model: one sentence naming the schedule. The agent starts
    anyway (the scheduler logs the same sentence at each slot and starts nothing)."""
    found: list[DefinitionError] = []
    for schedule in config.schedules:
        problem = schedule_problem(registry, schedule)
        if problem is not None:
            found.append(DefinitionError(f"{problem}."))
    return found


def schedule_problem(registry: WorkflowBuilder, schedule: ScheduleConfig) -> str | None:
    """Why ``schedule`` cannot start its workflow with ``registry``'s definitions, or None."""
    if schedule.workflow_type not in registry.workflow_types:
        return (
            f"schedule {schedule.name!r} starts workflow type {schedule.workflow_type!r}, which "
            "no loaded definition has; fix the name or add its definition"
        )
    try:
        registry.validate_data(schedule.workflow_type, schedule.data)
    except AgentError as exc:
        return f"schedule {schedule.name!r} has data that does not fit: {str(exc).rstrip('.')}"
    return None


def _configured(config: AgentConfig | None) -> list[Path]:
    """The config's ``definitions``, less the directories that do not exist yet: each of those is
    a warning (a fresh install has no ``/etc/edgesaga/workflows``; the bundled workflows still
    load), not a refusal to start. A missing ``*.yaml``/``*.yml`` entry names a definition file
    that is not there, so it stays in the list and fails as a problem."""
    present: list[Path] = []
    for path in config.definitions if config is not None else []:
        if path.exists() or path.suffix in (".yaml", ".yml"):
            present.append(path)
        else:
            log.warning(
                "definitions directory %s does not exist yet, so no workflows are loaded from "
                "it; create it and put definitions there, then restart the agent.",
                path,
            )
    return present


def load_definitions(config: AgentConfig, *, bundled: Path | None = None) -> list[LoadedDefinition]:
    """The definitions the agent runs with ``config`` (and ``bundled``, the directory of the
    workflows shipped with edgesaga, unless the config leaves them out), loaded and checked as
    ``edgesaga validate --config`` does (``python_path`` and ``yaml_limits`` included). A file
    that does not load raises its :class:`DefinitionError` (the first one); a step that does not
    fit the config's devices is logged as a warning, and fails when it runs, as before."""
    checked = check_definitions(config=config, bundled=bundled)
    if checked.problems:
        raise checked.problems[0]
    for mismatch in checked.mismatches:
        log.warning("%s (edgesaga validate --config lists every such problem)", mismatch)
    return [definition for _, definition, _ in checked.loaded]


def check_approve_with(
    definition: LoadedDefinition, devices: Mapping[str, Any] | None, node: yaml.Node | None = None
) -> list[DefinitionError]:
    """A HUMAN_INPUT step's ``approve_with`` must name a button or input device of the board
    (``devices``: the config's, name -> device with a ``kind``; None: no hardware section)."""
    problems: list[DefinitionError] = []
    for index, step in enumerate(definition.steps):
        device = step.spec.approve_with
        if device is None:
            continue
        known = ", ".join(repr(n) for n in devices or {}) or "none"
        found = None if devices is None else devices.get(device)
        if found is None:
            message = (
                f"approve_with names {device!r}, which is not a device in the agent config's "
                f"hardware section (known devices: {known}); add it or fix the name."
            )
        elif getattr(found, "kind", None) not in ("button", "input"):
            message = (
                f"approve_with needs a button or input device, but {device!r} is "
                f"{with_article(str(getattr(found, 'kind', 'unknown')))} device; use a button."
            )
        else:
            continue
        problems.append(
            DefinitionError(
                message,
                path=definition.source,
                step=step.name,
                key="approve_with",
                line=_line_of(node, ("steps", index, "approve_with")),
            )
        )
    return problems


def check_against_config(
    definition: LoadedDefinition, config: AgentConfig, node: yaml.Node | None = None
) -> list[DefinitionError]:
    """Problems only the agent config can reveal: ``resources`` and the bundled GPIO steps'
    ``device`` params naming devices the ``hardware`` section does not have (or of a kind the step
    cannot use), and GPIO steps in a config without a ``hardware`` section. ``node`` is the file's
    YAML node tree, for the lines."""
    hardware = config.hardware
    problems: list[DefinitionError] = []
    devices = hardware.devices if hardware is not None else {}
    known = ", ".join(repr(name) for name in devices) or "none"
    if hardware is not None:
        for index, name in enumerate(definition.spec.resources):
            if name not in devices:
                problems.append(
                    DefinitionError(
                        f"resources names {name!r}, which is not a device in the agent config's "
                        f"hardware section (known devices: {known}); add the device or fix the "
                        "name.",
                        path=definition.source,
                        key="resources",
                        line=_line_of(node, ("resources", index)),
                    )
                )
    problems.extend(check_approve_with(definition, devices if hardware is not None else None, node))
    for step, loc in steps_with_locations(definition):
        for key, func in (("function", step.function), ("compensate_function", step.compensate)):
            gpio = gpio_step_name(func)
            if gpio is None or gpio not in _DEVICE_KINDS:
                continue
            if hardware is None:
                problems.append(
                    DefinitionError(
                        f"hardware.steps.{gpio} drives GPIO, but the agent config has no hardware "
                        "section; add one with the devices (use `pin_factory: mock` on a "
                        "desktop).",
                        path=definition.source,
                        step=step.name,
                        key=key,
                        line=_line_of(node, (*loc, key)),
                    )
                )
                break
            device = step.spec.params.get("device")
            if not isinstance(device, str):
                continue  # the signature check already refused a missing device
            kinds, operation = _DEVICE_KINDS[gpio]
            config_device = devices.get(device)
            if config_device is None:
                message = (
                    f"device {device!r} is not in the agent config's hardware section (known "
                    f"devices: {known}); add it or fix the name."
                )
            elif config_device.kind not in kinds:
                message = (
                    f"hardware.steps.{gpio} needs {with_article(' or '.join(kinds))} device, but "
                    f"{device!r} is {with_article(config_device.kind)} device, which cannot "
                    f"{operation}; use another device or another step."
                )
            else:
                continue
            problems.append(
                DefinitionError(
                    message,
                    path=definition.source,
                    step=step.name,
                    key="device",
                    line=_line_of(node, (*loc, "params", "device")),
                )
            )
            break  # the compensation shares the params: one line per step
    return problems
