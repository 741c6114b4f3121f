"""The ``edgesaga`` command line. The only module that prints."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from agent._control import Control
from agent._definition import LoadedDefinition, discover, load_definition
from agent._engine import Workflow, WorkflowBuilder
from agent._errors import AgentError, StoreError
from agent._startup import resume_gc
from agent._status import WorkflowStatus
from agent._store import SQLiteStore
from hardware import HardwareError
from workflows import DIRECTORY as BUNDLED  # the CLI hands it down to the loader

if TYPE_CHECKING:
    import argparse  # imported by _parser(), which `edgesaga run` does not need

DEFAULT_DB = Path(".edgesaga") / "edgesaga.db"
RULE = "=" * 70


class UsageError(Exception):
    """A mistake on the command line, reported as one sentence."""


# ------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _local(args: argparse.Namespace) -> Iterator[WorkflowBuilder]:
    """A builder for running workflows in this process (no agent running).

    With ``--config`` it loads the config's definitions and builds its hardware board (outputs to
    their safe values first, as the agent would), so a hardware workflow runs the same way."""
    cfg_path = _config_path(args)
    builder: WorkflowBuilder
    board = None
    if cfg_path:
        # The agent's own loader: python_path, yaml_limits and max_state_bytes apply here too.
        from agent._config import load_config
        from agent._validate import load_definitions

        cfg = load_config(cfg_path)
        if cfg.hardware is not None:
            from hardware import Board

            board = Board.from_config(cfg.hardware)
            board.safe_state()
        builder = WorkflowBuilder(hardware=board, max_state_bytes=cfg.max_state_bytes)
        for definition in load_definitions(cfg, bundled=BUNDLED):
            builder.add_definition(definition)
        extra = list(getattr(args, "definitions", []))
        if extra:
            for path in discover(extra):
                builder.add_definition(load_definition(path))
    else:
        paths: list[str | Path] = [BUNDLED]
        paths.extend(getattr(args, "definitions", []))
        builder = WorkflowBuilder(definitions=paths)
    try:
        yield builder
    finally:
        if board is not None:
            board.close()


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get("EDGESAGA_CONFIG") or None


def _db(args: argparse.Namespace) -> Path:
    if getattr(args, "db", None):
        return Path(args.db)
    cfg = _config_path(args)
    if cfg:
        from agent._config import load_config

        return load_config(cfg).database
    return DEFAULT_DB


def _socket(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    cfg = _config_path(args)
    if cfg and not getattr(args, "db", None):
        from agent._config import load_config

        return load_config(cfg).socket_path
    return _db(args).parent / "control.sock"


def _agent(args: argparse.Namespace) -> Path | None:
    """The control socket of a running agent for this database, or None.

    A socket this user may not open is no reason to work on the database directly: an agent may
    be running behind it, so that is an error that says how to get access."""
    from agent._socket import agent_listening

    path = _socket(args)
    try:
        listening = agent_listening(path)
    except PermissionError:
        raise UsageError(
            f"This user lacks permission to open the agent's control socket {path}: add the user "
            f"to the group {_socket_group(path)} (sudo usermod -aG {_socket_group(path)} $USER, "
            "then log in again), or run the command with sudo."
        ) from None
    return path if listening else None


def _socket_group(path: Path) -> str:
    """The group that may use the socket (the agent's group; ``edgesaga`` under systemd)."""
    import grp

    try:
        return grp.getgrgid(path.stat().st_gid).gr_name
    except (OSError, KeyError):
        return "edgesaga"


class Refused(UsageError):
    """A command refused, by the running agent or by the CLI's own :class:`Control`: its sentence
    and its code, the same as over MQTT."""

    def __init__(self, reply: dict[str, Any], *, by_agent: bool) -> None:
        err = reply.get("error") or {}
        message, code = str(err.get("message", reply)), str(err.get("code", "?"))
        super().__init__(f"{'the agent refused: ' if by_agent else ''}{message} ({code})")


def _remote(path: Path, command: str, **fields: Any) -> dict[str, Any]:
    import uuid

    from agent._commands import COMMANDS
    from agent._socket import request

    if command in COMMANDS:
        fields.setdefault("request_id", f"cli-{uuid.uuid4()}")
    reply = request(path, command, **fields)
    if not reply.get("ok"):
        raise Refused(reply, by_agent=True)
    return reply


class _Here:
    """The driver of the CLI without an agent: what a command hands on (a start, a cancel, a
    retry) is driven here after the reply, to its end, by :func:`_drive`."""

    running = 0
    queued = 0

    def __init__(self) -> None:
        self.handed: list[Workflow] = []

    def submit(self, workflow: Workflow) -> bool:
        self.handed.append(workflow)
        return True


@contextlib.asynccontextmanager
async def _control(
    args: argparse.Namespace, *, write: bool
) -> AsyncIterator[tuple[Control, _Here]]:
    """The agent's command handler, in this process, on the database (no agent running).

    Commands that write load the definitions and the board as the agent does (see :func:`_local`);
    reading needs neither, nor the database's lock."""
    here = _Here()
    if not write:
        async with _open_store(args, write=False) as store:
            control = Control(builder=WorkflowBuilder(), store=store, runner=here, reraise=True)
            _config_clock(args, control)
            yield control, here
        return
    with _local(args) as builder:
        async with _open_store(args, write=True) as store:
            control = Control(
                builder=builder, store=store, runner=here, board=builder.hardware, reraise=True
            )
            yield control, here


def _config_clock(args: argparse.Namespace, control: Control) -> None:
    """The config's clock and schedules for a command read here (``schedules``, ``status``)."""
    cfg_path = _config_path(args)
    if not cfg_path:
        return
    from agent._clock import SystemClock
    from agent._config import load_config

    cfg = load_config(cfg_path)
    control.clock = SystemClock.from_config(cfg.clock)
    control.schedules = list(cfg.schedules)


async def _here(control: Control, command: str, **fields: Any) -> dict[str, Any]:
    """Carry out one command with ``control`` as the agent would; a refusal raises
    :class:`Refused` with the reply's sentence and code."""
    import uuid

    from agent._commands import CHANGES, CommandError, parse_command

    # A command that changes something is remembered by its request id: a new one per call.
    request_id = f"cli-{uuid.uuid4()}" if command in CHANGES else "cli"
    try:
        parsed = parse_command(command, {"request_id": request_id, **fields})
    except CommandError as err:
        raise Refused(err.reply(), by_agent=False) from None
    reply = await control.execute(parsed)
    if not reply.get("ok"):
        raise Refused(reply, by_agent=False)
    return reply


async def _drive(control: Control, here: _Here, workflow_id: str) -> Workflow:
    """Drive what the command handed on to its end; the workflow, as it is then."""
    for wf in here.handed:
        await wf.run()
    return await control.builder.load_workflow(workflow_id, control.store)


async def _ask(args: argparse.Namespace, command: str, **fields: Any) -> dict[str, Any]:
    """A command that only reads: through the running agent, else on the database here."""
    sock = _agent(args)
    if sock is not None:
        return _remote(sock, command, **fields)
    async with _control(args, write=False) as (control, _):
        return await _here(control, command, **fields)


def _not_a_directory(path: Path) -> Path:
    if path.is_dir():
        raise UsageError(
            f"{path} is a directory, not a database file; give a file, e.g. --db {path / 'edgesaga.db'}."
        )
    return path


def _open_store(args: argparse.Namespace, *, write: bool) -> SQLiteStore:
    path = _not_a_directory(_db(args))
    if not write:
        if not path.exists():
            raise UsageError(
                f"No database at {path}. Run `edgesaga demo` or `edgesaga start` first, or pass --db."
            )
        return SQLiteStore(path, readonly=True)
    return SQLiteStore(path)


def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"Cannot read {what} file {text[1:]}: {exc.strerror}.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}.") from None
    if not isinstance(value, dict):
        raise UsageError(f'{what} must be a JSON object, like \'{{"order_id": "A1"}}\'.')
    return value


def _fmt_time(ts: str | None) -> str:
    if not ts:
        return "-"
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).strftime("%H:%M:%S.%f")[:-3]


def _duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return ""
    a = datetime.fromisoformat(start.replace("Z", "+00:00"))
    b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    ms = (b - a).total_seconds() * 1000
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def print_workflow(info: dict[str, Any]) -> None:
    """A readable timeline of one workflow (the reply of a ``get`` command)."""
    print(f"Workflow {info['workflow_id']}  ({info['workflow_type']})")
    print(f"  status      {info['status']}" + ("   saga mode on" if info.get("saga") else ""))
    if info.get("current_step"):
        print(f"  step        {info['current_step']}")
    if info.get("waiting_for"):
        print(f"  waiting for {', '.join(info['waiting_for'])} (held by another workflow)")
    if info.get("error"):
        print(f"  error       {info['error']}")
    if info.get("waiting_input"):
        _print_waiting(info["workflow_id"], info["waiting_input"])
    print(f"  created     {info['created_at']}   updated {info['updated_at']}")
    journal = info.get("journal") or []
    if journal:
        print("  timeline")
        for j in journal:
            kind = "compensate" if j["phase"] == "compensate" else "step"
            err = f"  {j['error']}" if j.get("error") else ""
            print(
                f"    {_fmt_time(j['started_at'])}  {kind:<10} {j['step']:<22} attempt {j['attempt']}  "
                f"{j['outcome']:<11} {_duration(j['started_at'], j['ended_at']):>8}{err}"
            )
    print("  state")
    for key, value in info.get("state", {}).items():
        print(f"    {key}: {json.dumps(value)}")


def _print_waiting(workflow_id: str, waiting: dict[str, Any]) -> None:
    """What a PAUSED workflow waits for, in words (``show``)."""
    schema = waiting.get("schema") or {}
    props: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    print(f"  waiting     for input at step {waiting.get('step')}:")
    for name, prop in props.items():
        kind = prop.get("type") or " or ".join(
            str(p.get("type")) for p in prop.get("anyOf", []) if p.get("type")
        )
        how = "required" if name in required else f"default {json.dumps(prop.get('default'))}"
        print(f"                {name} ({kind or 'any'}, {how})")
    if waiting.get("timeout") is not None:
        print(f"              times out after {waiting['timeout']:g} s")
    if waiting.get("approve_with"):
        print(f"              a press of {waiting['approve_with']} approves it with the defaults")
    print(f"              resume with: edgesaga resume {workflow_id} --data '{{...}}'")


def print_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("No workflows.")
        return
    print(f"{'WORKFLOW ID':<36}  {'TYPE':<20} {'STATUS':<20} {'STEP':<20} UPDATED")
    for r in rows:
        print(
            f"{r['workflow_id']:<36}  {r['workflow_type']:<20} {r['status']:<20} "
            f"{(r.get('current_step') or '-'):<20} {r['updated_at']}"
        )
        if r.get("waiting_input"):  # PAUSED: the input it waits for
            fields = ", ".join(r["waiting_input"]["fields"]) or "(no fields: send {})"
            print(f"{'':<38}waiting for input: {fields}")


# ------------------------------------------------------------------------------------------------
# commands


async def cmd_demo(args: argparse.Namespace) -> int:
    db = _not_a_directory(_db(args))
    if args.log_level.upper() == "WARNING":
        # The demo fails on purpose; its story says so, the warning lines would only repeat it.
        logging.getLogger("edgesaga.workflow").setLevel(logging.ERROR)
    print(RULE)
    print(" EDGESAGA SAGA PATTERN DEMO")
    print(RULE)
    print(f"Database: {db} (SQLite, WAL, synchronous=FULL)")
    # Each bundled workflow's demo lives beside it (workflows/<name>/demo.py).
    from workflows.irrigation import demo as irrigation
    from workflows.payment import demo as payment

    part = getattr(args, "part", None)
    async with SQLiteStore(db) as store:
        results: list[bool] = []
        summary: list[str] = []
        if part in (None, "payment"):
            results, summary = await payment.run_demo(store)
        if part == "payment":  # the refund that waits for a person's approval
            more, lines = await payment.run_approval_demo(store)
            results, summary = [*results, *more], [*summary, *lines]
        if part in (None, "irrigation"):
            results.extend(await irrigation.run_demo(store))
        if part == "irrigation":  # a DECISION on the soil sensor and a PARALLEL of two valves
            more, lines = await irrigation.run_flow_demo(store)
            results, summary = [*results, *more], [*summary, *lines]
    print("\n" + RULE)
    print(" SUMMARY")
    print(RULE)
    for line in summary:
        print(line)
    print(
        f"\nEverything above is in {db}: try `edgesaga list --db {db}` and `edgesaga show <id> --db {db}`."
    )
    return 0 if all(results) else 1


async def cmd_validate(args: argparse.Namespace) -> int:
    from agent._config import load_config
    from agent._validate import check_definitions

    cfg_path = _config_path(args)
    cfg = load_config(cfg_path) if cfg_path else None
    if not args.paths and cfg is None:
        raise UsageError(
            "Name the workflow definition files or directories to check, or give --config to "
            "check the ones the agent would load."
        )
    checked = check_definitions(args.paths, config=cfg, bundled=BUNDLED)
    named: set[Path] = set()
    for item in args.paths:
        with contextlib.suppress(AgentError):  # a missing path is among the problems already
            named.update(f.resolve() for f in discover([item]))
    mismatched = {m.path for m in checked.mismatches}
    shown = [
        (f, d)
        for f, d, bundled in checked.loaded
        # the bundled ones too when checking what the config loads, else only if named
        if (not bundled or not args.paths or f.resolve() in named) and str(f) not in mismatched
    ]
    problems = checked.all_problems()
    if not shown and not problems:
        raise UsageError("No workflow definitions (YAML files with workflow_type) found there.")
    steps = 0
    for f, d in shown:
        steps += len(d.steps)
        counted = _count(len(d.steps), "step")
        print(f"ok  {f}: {d.workflow_type} {d.version}, {counted}, hash {d.hash[:12]}")
    for problem in problems:  # as every other error of the CLI: on stderr, exit status 2
        print(f"edgesaga: error: {problem}", file=sys.stderr)
    summary = f"{_count(len(shown), 'workflow')}, {_count(steps, 'step')}"
    if problems:
        files = _count(len(checked.bad_files()), "file")
        summary += f"; {_count(len(problems), 'problem')} in {files}"
    print(summary)
    return 2 if problems else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


async def cmd_start(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {
        "workflow_type": args.workflow_type,
        "data": _json_arg(args.data, "--data"),
    }
    if args.saga:
        fields["saga"] = True
    if args.id:
        fields["workflow_id"] = args.id
    sock = _agent(args)
    if sock is not None:
        print(json.dumps(_remote(sock, "start", **fields), indent=2))
        return 0
    async with _control(args, write=True) as (control, here):
        reply = await _here(control, "start", **fields)
        print(f"started {reply['workflow_type']} {reply['workflow_id']}", file=sys.stderr)
        wf = await _drive(control, here, reply["workflow_id"])
        print(json.dumps({**wf.snapshot(), "state": wf.state.model_dump(mode="json")}, indent=2))
    # PAUSED: it waits at a HUMAN_INPUT step for `edgesaga resume` (the snapshot says for what)
    return 0 if wf.status in (WorkflowStatus.COMPLETED, WorkflowStatus.PAUSED) else 3


#: Rows per page of ``edgesaga list`` (and of the list command) unless --limit says otherwise.
LIST_LIMIT = 50


async def cmd_list(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"limit": args.limit}
    options = {"status": "status", "type": "workflow_type", "since": "since", "until": "until"}
    for option, name in {**options, "cursor": "cursor"}.items():
        if getattr(args, option):
            fields[name] = getattr(args, option)
    reply = await _ask(args, "list", **fields)
    rows = reply["workflows"]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_list(rows)
    if reply.get("next_cursor"):
        # On stderr: stdout stays the rows alone (a table, or the JSON array scripts read).
        sys.stdout.flush()
        print(f"more: {_next_page(args, reply['next_cursor'])}", file=sys.stderr)
    return 0


def _next_page(args: argparse.Namespace, cursor: str) -> str:
    """The command line of the next page: this one's options, with the reply's cursor."""
    import shlex

    words = ["edgesaga", "list"]
    for status in args.status or []:
        words += ["--status", status]
    for option in ("type", "since", "until", "db", "config", "socket"):
        if getattr(args, option, None):
            words += [f"--{option}", getattr(args, option)]
    if args.limit != LIST_LIMIT:
        words += ["--limit", str(args.limit)]
    if args.json:
        words.append("--json")
    return shlex.join([*words, "--cursor", cursor])


async def cmd_show(args: argparse.Namespace) -> int:
    info = await _ask(args, "get", workflow_id=args.workflow_id)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_workflow(info)
    return 0


async def cmd_get(args: argparse.Namespace) -> int:
    """``show --json``, by the name of the MQTT and socket command that returns the same JSON."""
    args.json = True
    return await cmd_show(args)


async def cmd_recover(args: argparse.Namespace) -> int:
    with _local(args) as builder:
        async with _open_store(args, write=True) as store:
            workflows = await builder.recover(store)
    for wf in workflows:
        print(f"{wf.id}  {wf.workflow_type:<20} {wf.status.value}")
    if not workflows:
        print("Nothing to recover.")
    return 0


async def _operate(args: argparse.Namespace, command: str, **fields: Any) -> Workflow | None:
    """A command that changes a workflow: through the running agent (its reply printed; None),
    else here, driven to its end (its final snapshot printed; the workflow)."""
    sock = _agent(args)
    if sock is not None:
        print(json.dumps(_remote(sock, command, **fields), indent=2))
        return None
    async with _control(args, write=True) as (control, here):
        reply = await _here(control, command, **fields)
        wf = await _drive(control, here, reply["workflow_id"])
        print(json.dumps(wf.snapshot(), indent=2))
    return wf


async def cmd_cancel(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"workflow_id": args.workflow_id}
    if args.reason:
        fields["reason"] = args.reason
    await _operate(args, "cancel", **fields)
    return 0


async def cmd_retry(args: argparse.Namespace) -> int:
    wf = await _operate(args, "retry", workflow_id=args.workflow_id)
    return 0 if wf is None or wf.status is WorkflowStatus.COMPLETED else 3


async def cmd_resume(args: argparse.Namespace) -> int:
    data = _json_arg(args.data, "--data")
    wf = await _operate(args, "resume", workflow_id=args.workflow_id, data=data)
    done = (WorkflowStatus.COMPLETED, WorkflowStatus.PAUSED)  # PAUSED: at its next HUMAN_INPUT
    return 0 if wf is None or wf.status in done else 3


def _pin_setting(text: str) -> tuple[str, bool]:
    """``NAME=VALUE`` of ``pins --set``: VALUE is one of 0, 1, true, false, on, off (any case)."""
    name, sep, value = text.partition("=")
    words = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}
    if not sep or not name or value.lower() not in words:
        raise UsageError(
            f"--set takes NAME=VALUE with VALUE one of 0, 1, true, false, on or off, "
            f"like --set float=on; {text!r} is not that."
        )
    return name, words[value.lower()]


async def cmd_schedules(args: argparse.Namespace) -> int:
    reply = await _ask(args, "schedules")
    rows = reply["schedules"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No schedules in the agent config (see docs/configuration.md, schedules).")
        return 0
    for row in rows:
        print(
            f"{row['name']}: {row['workflow_type']} at {row['cron']!r} in {row['timezone']} "
            f"(missed: {row['missed']}, overlap: {row['overlap']})"
        )
        if row["waits_for_clock_sync"]:
            print("  next  waits for clock sync")
        elif row["next_fire"] is None:
            print("  next  none (the cron expression names no later time)")
        else:
            print(f"  next  {row['next_fire']} ({row['next_fire_utc']})")
        last = row["last_run"]
        if last is None:
            print("  last  never fired")
        else:
            status = last["status"] or "pruned (finished)"
            print(f"  last  {last['slot']}  workflow {last['workflow_id']}  {status}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    sock = _agent(args)
    reply = _remote(sock, "status") if sock is not None else await _ask(args, "status")
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    for line in status_lines(reply, running=sock is not None):
        print(line)
    return 0


def status_lines(reply: dict[str, Any], *, running: bool) -> list[str]:
    """What ``edgesaga status`` prints of a status reply."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(reply.get("counts", {}).items())) or "none"
    if running:
        mqtt = {True: "connected", False: "disconnected", None: "off"}[reply.get("mqtt_connected")]
        lines = [
            f"agent     {reply.get('device_id')} running (pid {reply.get('pid')})",
            f"runner    running {reply.get('running')}, queued {reply.get('queued')}",
            f"mqtt      {mqtt}",
        ]
    else:
        lines = ["agent     not running (what follows is read from the database)"]
    lines.append(f"stored    {counts}")
    if reply.get("clock_synchronized"):
        lines.append("clock     synchronized")
    else:
        waiting = reply.get("timers_waiting_on_sync", 0)
        lines.append(f"clock     not synchronized; {waiting} timer(s) wait for it")
    return lines


async def cmd_pins(args: argparse.Namespace) -> int:
    setting = None if args.set is None else _pin_setting(args.set)  # checked before the agent
    sock = _agent(args)
    if sock is None:
        raise UsageError(
            f"No agent is running on {_socket(args)}; `edgesaga pins` reads the pins of a running "
            "agent (start one with `edgesaga run --config agent.yaml`)."
        )
    if setting is not None:
        reply = _remote(sock, "set_input", device=setting[0], value=setting[1])
    else:
        reply = _remote(sock, "pins")
    for name, value in reply["pins"].items():
        print(f"{name:<16} {value}")
    return 0


async def cmd_run(args: argparse.Namespace) -> int:
    from agent._config import load_config
    from agent._logging import setup_logging
    from agent._service import Agent

    cfg = load_config(_config_path(args))
    setup_logging(cfg.logging.level, cfg.logging.format)
    return await Agent(cfg).run()


async def cmd_watch(args: argparse.Namespace) -> int:
    from agent._config import MqttSettings, load_config
    from agent._watch import watch

    cfg_path = _config_path(args)
    settings = load_config(cfg_path).mqtt if cfg_path else MqttSettings()
    updates: dict[str, Any] = {}
    if args.host:
        updates["host"] = args.host
    if args.port:
        updates["port"] = args.port
    if updates:
        settings = settings.model_copy(update=updates)
    await watch(settings, device=args.device)
    return 0


# ------------------------------------------------------------------------------------------------


async def cmd_schema(args: argparse.Namespace) -> int:
    from agent._jsonschema import schema_text

    sys.stdout.write(schema_text(args.which))
    return 0


def _graph_definition(args: argparse.Namespace) -> LoadedDefinition:
    """The definition of ``args.workflow_type``: bundled, --definitions and the config's."""
    cfg_path = _config_path(args)
    definitions: list[LoadedDefinition] = []
    if cfg_path:
        from agent._config import load_config
        from agent._validate import load_definitions

        definitions = list(load_definitions(load_config(cfg_path), bundled=BUNDLED))
        paths = discover(args.definitions) if args.definitions else []
    else:
        paths = discover([BUNDLED, *args.definitions])
    definitions += [load_definition(path) for path in paths]
    found = [d for d in definitions if d.workflow_type == args.workflow_type]
    if not found:
        known = ", ".join(sorted({d.workflow_type for d in definitions})) or "none"
        raise UsageError(
            f"No workflow type {args.workflow_type!r} is defined (known: {known}); check the "
            "name, or add its file with --definitions."
        )
    return found[-1]


async def cmd_graph(args: argparse.Namespace) -> int:
    from agent._graph import instance_marks, mermaid

    definition = _graph_definition(args)
    marks = None
    if args.instance:
        info = await _ask(args, "get", workflow_id=args.instance)
        kind = info.get("workflow_type")
        if kind != definition.workflow_type:
            raise UsageError(
                f"Workflow {args.instance} is a {kind}, not a {definition.workflow_type}; graph "
                f"its own type: edgesaga graph {kind} --instance {args.instance}."
            )
        marks = instance_marks(info)
    sys.stdout.write(mermaid(definition.spec, marks))
    return 0


# Long, and not split: one flat declaration per sub-command, read top to bottom like the help.
def _parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="edgesaga",
        description="Durable saga workflows for Raspberry-Pi-class devices.",
    )
    from agent._logging import LEVELS, check_level

    def log_level(text: str) -> str:
        try:
            return check_level(text)
        except ValueError:  # argparse prints this after "argument --log-level:"
            raise argparse.ArgumentTypeError(
                f"unknown log level {text!r} (given here or in EDGESAGA_LOG_LEVEL); use one of "
                f"{', '.join(LEVELS)}."
            ) from None

    # A string default goes through `type` too, so a bad EDGESAGA_LOG_LEVEL is refused as well.
    p.add_argument(
        "--log-level",
        type=log_level,
        default=os.environ.get("EDGESAGA_LOG_LEVEL", "WARNING"),
        help=f"one of {', '.join(LEVELS)} (default $EDGESAGA_LOG_LEVEL, else WARNING)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_db(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--db", help=f"SQLite database file (default {DEFAULT_DB}, or the config's)"
        )
        sp.add_argument("--config", help="agent config; its database and control socket are used")
        sp.add_argument(
            "--socket", help="control socket of a running agent (default: beside the database)"
        )

    def with_defs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--definitions",
            action="append",
            default=[],
            metavar="PATH",
            help="extra workflow YAML file or directory (repeatable); bundled workflows are always loaded",
        )

    sp = sub.add_parser(
        "demo",
        help="run the payment saga (success, then carrier failure) and the irrigation workflow on mock pins",
        description=(
            "Without a name: the saga tutorial's payment runs (success, then the carrier failing) "
            "and the irrigation workflow on mock pins (the float switch closing, then never). "
            "`demo payment` adds PaymentWithApproval (a refund waiting for a person's approval); "
            "`demo irrigation` adds SoilIrrigation (a DECISION on the soil sensor: watered, then "
            "skipped) and TwoBeds (a PARALLEL of two valves)."
        ),
    )
    sp.add_argument(
        "part",
        nargs="?",
        choices=["payment", "irrigation"],
        help="only this part, with its control-flow examples",
    )
    with_db(sp)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser(
        "validate",
        help="load and check workflow definitions as the agent would (exit status 2 on a problem)",
    )
    sp.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="definition file or directory (default with --config: the config's definitions)",
    )
    sp.add_argument(
        "--config",
        help="agent config: also check devices, resources and python_path against it, and the "
        "definitions it loads (default: $EDGESAGA_CONFIG)",
    )
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser(
        "start",
        help="start a workflow (through a running agent, else run it here to its end)",
        description=(
            "Start a workflow. With a running agent (its control socket answers) the agent runs it: "
            "this prints the agent's reply at once, status ACTIVE; follow it with `edgesaga show ID`. "
            "Without one it runs here to its end, is journaled in the database, prints its final "
            "snapshot and exits 0 if it COMPLETED (or PAUSED, waiting for `edgesaga resume`), else with "
            "exit code 3."
        ),
    )
    sp.add_argument("workflow_type")
    sp.add_argument("--data", help="initial state as JSON, or @file.json")
    sp.add_argument("--saga", action="store_true", help="enable saga mode (compensate on failure)")
    sp.add_argument("--id", help="workflow id (idempotent: an existing id is not started twice)")
    with_db(sp)
    with_defs(sp)
    sp.set_defaults(func=cmd_start)

    sp = sub.add_parser(
        "list",
        help="list workflows, newest first, a page at a time",
        description=(
            "List workflows, newest first. When there are more than --limit, the command line of "
            "the next page is printed last on stderr (more: edgesaga list ... --cursor C)."
        ),
    )
    sp.add_argument(
        "--status",
        action="append",
        choices=[s.value for s in WorkflowStatus],
        help="only this status (repeatable)",
    )
    sp.add_argument("--type", help="only this workflow type")
    sp.add_argument(
        "--since",
        metavar="TIME",
        help="created after TIME, ISO 8601 with a zone: 2026-12-01T10:00Z",
    )
    sp.add_argument("--until", metavar="TIME", help="created before TIME (same form)")
    sp.add_argument(
        "--limit",
        type=int,
        default=LIST_LIMIT,
        help=f"rows per page, 1 to 1000 (default {LIST_LIMIT})",
    )
    sp.add_argument(
        "--cursor", help="the page after this cursor (the last line of the page before)"
    )
    sp.add_argument("--json", action="store_true", help="the rows as a JSON array")
    with_db(sp)
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("show", help="one workflow: status, state and its journal as a timeline")
    sp.add_argument("workflow_id")
    sp.add_argument("--json", action="store_true")
    with_db(sp)
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser(
        "get", help="one workflow as JSON: what the get command returns over MQTT (show --json)"
    )
    sp.add_argument("workflow_id")
    with_db(sp)
    sp.set_defaults(func=cmd_get)

    sp = sub.add_parser(
        "recover",
        help="with no agent running: resume every ACTIVE and COMPENSATING workflow here",
    )
    with_db(sp)
    with_defs(sp)
    sp.set_defaults(func=cmd_recover)

    sp = sub.add_parser("cancel", help="cancel a workflow (saga mode: compensate first)")
    sp.add_argument("workflow_id")
    sp.add_argument("--reason")
    with_db(sp)
    with_defs(sp)
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser(
        "retry",
        help="retry a FAILED or COMPENSATION_FAILED workflow (no agent: here; exit code 3 unless it COMPLETED)",
    )
    sp.add_argument("workflow_id")
    with_db(sp)
    with_defs(sp)
    sp.set_defaults(func=cmd_retry)

    sp = sub.add_parser(
        "resume",
        help="resume a PAUSED workflow with input data (no agent: here; exit code 3 unless it "
        "COMPLETED or PAUSED again)",
        description=(
            "Resume a workflow PAUSED at a HUMAN_INPUT step: --data is checked against the step's "
            "input model (see `edgesaga show ID`); input that does not fit is refused naming the "
            "field, and the workflow stays PAUSED. With a running agent the agent goes on with "
            "it; without one it runs here to its end (or its next pause)."
        ),
    )
    sp.add_argument("workflow_id")
    sp.add_argument(
        "--data", help="input as JSON, or @file.json (default {}: the model's defaults)"
    )
    with_db(sp)
    with_defs(sp)
    sp.set_defaults(func=cmd_resume)

    sp = sub.add_parser(
        "schedules",
        help="each schedule of the agent config: its next fire time and its last run",
        description=(
            "Each schedule of the agent config (--config; a running agent's own): the next fire "
            "time in its time zone and in UTC, or 'waits for clock sync' while the clock is not "
            "synchronized, and its last run (slot, workflow id, status)."
        ),
    )
    sp.add_argument("--json", action="store_true", help="the rows as a JSON array")
    with_db(sp)
    sp.set_defaults(func=cmd_schedules)

    sp = sub.add_parser(
        "status",
        help="the agent's state: runner, stored workflows, MQTT, the clock's sync",
    )
    sp.add_argument("--json", action="store_true", help="the status reply as JSON")
    with_db(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser(
        "pins", help="show (or --set NAME=VALUE a mock input of) a running agent's pins"
    )
    sp.add_argument("--set", metavar="NAME=VALUE", help="drive a mock input (desktop simulation)")
    with_db(sp)
    sp.set_defaults(func=cmd_pins)

    sp = sub.add_parser("run", help="run the agent (systemd service) with --config agent.yaml")
    sp.add_argument("--config", help="agent config file (default: $EDGESAGA_CONFIG, else defaults)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("watch", help="print the MQTT event stream live, one line per transition")
    sp.add_argument("--device", default="+", help="device id, or + for all (default)")
    sp.add_argument("--config", help="agent config (for the broker settings)")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.set_defaults(func=cmd_watch)

    sp = sub.add_parser(
        "schema",
        help="print the JSON Schema of a workflow definition or of the agent config",
        description=(
            "Print the JSON Schema generated from the models the agent validates with. The "
            "copies in docs/schema/ are this output: regenerate them with `edgesaga schema "
            "workflow > docs/schema/workflow.schema.json` (and config)."
        ),
    )
    sp.add_argument("which", choices=["workflow", "config"])
    sp.set_defaults(func=cmd_schema)

    sp = sub.add_parser(
        "graph",
        help="print a Mermaid flowchart of a workflow type (--instance: the path one run took)",
        description=(
            "Print a Mermaid flowchart (flowchart TD) of a workflow type: its steps shaped by "
            "type, routes, parallel branches, END, the pivot and dashed edges to each step's "
            "compensation. --instance ID marks the steps that instance ran, where it failed and "
            "what was compensated (read as `show` reads it; no agent needed)."
        ),
    )
    sp.add_argument("workflow_type")
    sp.add_argument("--instance", metavar="ID", help="mark the path of this workflow instance")
    with_db(sp)
    with_defs(sp)
    sp.set_defaults(func=cmd_graph)

    from agent._fleet import add_fleet_parser

    add_fleet_parser(sub)
    return p


def _run_args(argv: Sequence[str]) -> SimpleNamespace | None:
    """The arguments of ``edgesaga run [--config PATH]`` (the systemd unit's command line) parsed
    without argparse, or None for any other command line.

    Importing argparse and building the parser with all its sub-commands is a noticeable part of
    the agent's start-up. The result has the attributes argparse would set; anything else (help,
    other options, ``--log-level``, a value that looks like an option) is left to argparse."""
    match list(argv):
        case ["run"]:
            config = None
        case ["run", "--config", str() as path] if path and not path.startswith("-"):
            config = path
        case ["run", str() as option] if option.startswith("--config=") and option != "--config=":
            config = option.removeprefix("--config=")
        case _:
            return None
    log_level = os.environ.get("EDGESAGA_LOG_LEVEL", "WARNING")
    from agent._logging import check_level

    try:
        check_level(log_level)
    except ValueError:
        return None  # argparse refuses it in one sentence
    return SimpleNamespace(log_level=log_level, command="run", config=config, func=cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
    args = _run_args(sys.argv[1:] if argv is None else argv) or _parser().parse_args(argv)
    if args.command != "run":  # `run` turns the collector on once the agent is READY
        resume_gc(collect=False)  # a one-shot command: start-up garbage costs it nothing
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = asyncio.run(args.func(args))
        return code
    except BrokenPipeError:
        # Only stdout raises it (the socket client turns its own into ConnectionError): the
        # reader went away, as `edgesaga list | head` does. Nothing is left to tell it, so end
        # quietly, and keep the interpreter's final flush from trying again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (AgentError, UsageError, HardwareError) as exc:
        sentence = str(exc)
        if isinstance(exc, StoreError):
            sentence = _with_database_fix(sentence)
        print(f"edgesaga: error: {sentence}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:
        print(f"edgesaga: error: talking to the agent failed: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        fix = _database_fix(str(exc))
        if fix is None:
            raise  # not a known trouble with the file: a bug, shown with its traceback
        print(
            f"edgesaga: error: Cannot use the database {_db_path(args)}: {exc}; {fix}.",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        explained = _os_error_sentence(exc)
        if explained is None:
            raise
        print(f"edgesaga: error: {explained}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesaga: interrupted", file=sys.stderr)
        return 130


# What a user can do about the file-system troubles that reach the command line, by the message
# SQLite gives (in a sqlite3 error, or at the end of the store's "Cannot open the database" error)
# and by errno. Anything else is not a user's mistake and keeps its traceback.
_AS_OWNER = "run edgesaga as their owner (e.g. sudo -u edgesaga edgesaga ...)"
_DATABASE_FIXES = {
    "attempt to write a readonly database": (
        f"this user may not write it, its -wal and -shm files or its directory; {_AS_OWNER}, "
        "or give --db a file this user may write"
    ),
    "unable to open database file": (
        "this user may not open it, or not create its -wal and -shm files beside it; "
        f"{_AS_OWNER}, or check the path"
    ),
    "disk I/O error": "check that the path names a file and that its disk is healthy",
    "file is not a database": "give --db (or the config's database) the edgesaga database file",
    "database disk image is malformed": "the file is damaged: restore it from a backup",
}
_OS_FIXES = {
    errno.EACCES: "run edgesaga as a user who may use it (e.g. with sudo), or change its permissions",
    errno.EPERM: "run edgesaga as a user who may use it (e.g. with sudo), or change its permissions",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOENT: "check the path on the command line and in the config",
    errno.ENOTDIR: "check the path on the command line and in the config",
    errno.EISDIR: "give the path of a file instead",
    errno.ENOSPC: "free some space on that disk",
}


def _database_fix(message: str) -> str | None:
    known = message.rstrip(".")
    return next((fix for text, fix in _DATABASE_FIXES.items() if known.endswith(text)), None)


def _with_database_fix(sentence: str) -> str:
    fix = _database_fix(sentence)
    return f"{sentence.rstrip('.')}; {fix}." if fix else sentence


def _db_path(args: Any) -> str:  # argparse.Namespace, or SimpleNamespace for `run`
    try:
        return str(_db(args))
    except Exception:  # the config that names it is the trouble; the message says enough
        return "(from the config)"


def _os_error_sentence(exc: OSError) -> str | None:
    if exc.errno is None:
        # Raised with a sentence of ours (a control_socket path that is not a socket, ...).
        return str(exc) if len(exc.args) == 1 and isinstance(exc.args[0], str) else None
    fix = _OS_FIXES.get(exc.errno)
    if fix is None:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror}{where}; {fix}."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
