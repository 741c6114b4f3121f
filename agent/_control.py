"""Carries out every operator command, whichever path it comes by: MQTT, the control socket, or
the CLI without a running agent (which builds a ``Control`` in its own process).

The command models (:mod:`agent._commands`) are imported by the methods that use them, on the first
command: the agent builds this handler before it reports READY, but needs no command model until a
command arrives, and building them is a noticeable part of start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from agent._clock import Clock, SystemClock
from agent._engine import Workflow, WorkflowBuilder
from agent._errors import AgentError, DiskFull, WorkflowNotFound
from agent._messages import error_reply, ok_reply
from agent._records import InstanceRecord
from agent._saga import can_cancel
from agent._status import WorkflowStatus
from agent._store import COMMAND_HASH, SCHEDULE_FIRE, SQLiteStore

if TYPE_CHECKING:
    from agent._commands import Command, StartCommand
    from agent._schedules import ScheduleConfig

log = logging.getLogger("edgesaga.control")

_REQUEST_NS = uuid.UUID("6f1f3c1e-5f0a-4a8e-9a53-7e0d2f1b9c11")


class Driver(Protocol):
    """What drives the workflows a command hands on: the agent's :class:`~agent._runner.Runner`,
    or the CLI's own loop when no agent runs."""

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def submit(self, workflow: Workflow) -> bool: ...


def input_fields(waiting: dict[str, Any]) -> list[str]:
    """The field names of the input a paused workflow waits for (from its JSON Schema)."""
    schema = waiting.get("schema") or {}
    return list(schema.get("properties") or {})


def command_hash(command: Command) -> str:
    """What a request id is remembered with: a hash of the command's name and validated body
    (its ``request_id`` and ``reply_to`` left out, keys sorted, defaults filled in), so only an
    identical repeat gets the first answer."""
    body = command.model_dump(mode="json", exclude={"request_id", "reply_to"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _conflict(request_id: str) -> dict[str, Any]:
    return error_reply(
        request_id,
        "request_id_conflict",
        f"Request id {request_id!r} was already used for another command or body; give a new "
        "command a new request_id (only an identical repeat gets the first answer).",
    )


#: Codes of failures that are not the command's fault (the CLI without an agent lets them through).
_NOT_REFUSALS = ("internal_error", "disk_full")


def _refused(request_id: str | None, name: str, err: Exception) -> dict[str, Any]:
    """The error reply of a command that failed with ``err``: an :class:`AgentError` carries its
    code; anything else is a bug, logged with its traceback."""
    if not isinstance(err, AgentError):
        log.exception("command %s (request %s) failed unexpectedly", name, request_id)
        return error_reply(request_id, "internal_error", f"{type(err).__name__}: {err}")
    if err.code == "internal_error":
        log.exception("command %s (request %s) failed", name, request_id)
    elif err.code == "disk_full":
        log.error("command %s (request %s): %s", name, request_id, err)
    return error_reply(request_id, err.code, str(err))


class Control:
    """Carries out commands against the builder, the store, the driver and the board."""

    def __init__(
        self,
        *,
        builder: WorkflowBuilder,
        store: SQLiteStore,
        runner: Driver,
        max_payload: int = 64 * 1024,
        board: Any = None,
        device_id: str = "",
        mqtt_connected: Callable[[], bool | None] = lambda: None,
        reraise: bool = False,
        clock: Clock | None = None,
        schedules: Sequence[ScheduleConfig] = (),
        timers_waiting: Callable[[], int] = lambda: 0,
        checked_at: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.builder = builder
        self.store = store
        self.runner = runner
        self.max_payload = max_payload
        self.board = board  # hardware.Board, or None when the config has no hardware section
        self.device_id = device_id
        self.mqtt_connected = mqtt_connected
        # The CLI without an agent: a failure that is not the command's fault (a full disk, a
        # database it may not write, a bug) reaches the command line, which explains it.
        self.reraise = reraise
        self._inflight: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.schedules = list(schedules)
        # How many durable timers wait for the clock's sync (the timer service's count), and
        # when the scheduler last looked at the clock.
        self.timers_waiting = timers_waiting
        self.checked_at = checked_at

    async def handle_raw(
        self, name: str, payload: bytes | str
    ) -> tuple[dict[str, Any], str | None]:
        """A command from MQTT: parse and execute; returns ``(reply, reply_to)``. Never raises for
        bad input."""
        from agent._commands import COMMANDS

        return await self._handle(name, payload, COMMANDS)

    async def handle_local(
        self, name: str, payload: bytes | str
    ) -> tuple[dict[str, Any], str | None]:
        """A command from the control socket: those of MQTT, and ``pins``, ``set_input`` and
        ``status``."""
        from agent._commands import LOCAL_COMMANDS

        return await self._handle(name, payload, LOCAL_COMMANDS)

    async def _handle(
        self, name: str, payload: bytes | str, commands: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        from agent._commands import CommandError, parse_command

        try:
            command = parse_command(name, payload, max_payload=self.max_payload, commands=commands)
        except CommandError as err:
            log.warning("rejected %s command (request %s): %s", name, err.request_id, err.message)
            return err.reply(), err.reply_to
        return await self.execute(command), command.reply_to

    async def execute(self, command: Command) -> dict[str, Any]:
        """Carry out a validated command and return the reply (ok or error). Never raises for a
        failing store: a full disk gets the ``disk_full`` reply, whatever the command."""
        from agent._commands import CancelCommand, ResumeCommand, RetryCommand, StartCommand

        # The reply of an accepted mutating command is stored with the hash of the command, so
        # an identical repeat (QoS 1 redelivery, a caller's retry) gets it, and a request id
        # reused for another command or body is refused. Refusals are not stored: a corrected
        # command may reuse the id.
        if not isinstance(command, StartCommand | CancelCommand | ResumeCommand | RetryCommand):
            return await self._guarded(command)
        rid = command.request_id
        digest = command_hash(command)
        # A repeat of a request id gets the first answer, also when both arrive at once.
        running = self._inflight.get(rid)
        if running is not None:
            first_digest, first = running
            if first_digest != digest:
                return _conflict(rid)
            return await asyncio.shield(first)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[rid] = (digest, fut)
        try:
            reply = await self._execute_once(command, digest)
            fut.set_result(reply)
            return reply
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(rid, None)

    async def _execute_once(self, command: Command, digest: str) -> dict[str, Any]:
        from agent._commands import StartCommand

        rid = command.request_id
        assert rid is not None  # a mutating command always has one
        try:
            stored = await self.store.lookup_request(rid)
        except Exception as exc:
            if self.reraise:
                raise
            if isinstance(exc, DiskFull):
                return _refused(rid, command.command, exc)
            log.error("command %s (request %s): the store failed: %s", command.command, rid, exc)
            return error_reply(
                rid,
                "internal_error",
                f"The database could not be read ({exc}); see the agent's log.",
            )
        if stored is not None:
            reply, stored_digest = stored
            # A reply stored before hashes were kept is the first answer, whatever the command.
            return reply if stored_digest in (None, digest) else _conflict(rid)
        reply = await self._guarded(command)
        if reply.get("ok") and not isinstance(command, StartCommand):
            # (A successful start stored its reply in the same transaction as the instance.)
            try:
                await self.store.put_request(rid, reply, digest)
            except Exception as exc:
                # The command took effect; only its dedupe record is missing.
                log.error(
                    "command %s (request %s) was carried out, but its reply could not be stored "
                    "(%s); a repeat of the request will be carried out again",
                    command.command,
                    rid,
                    exc,
                )
        return reply

    async def _guarded(self, command: Command) -> dict[str, Any]:
        try:
            return await self._dispatch(command)
        except Exception as err:
            if self.reraise and getattr(err, "code", "internal_error") in _NOT_REFUSALS:
                raise
            return _refused(command.request_id, command.command, err)

    async def _dispatch(self, command: Command) -> dict[str, Any]:
        from agent import _commands as c

        rid = command.request_id
        match command:
            case c.StartCommand():
                return await self._start(command)
            case c.CancelCommand():
                wf = await self.cancel(command.workflow_id, command.reason)
                return self._ok(rid, wf, cancel_requested=True)
            case c.RetryCommand():
                wf = await self.builder.load_workflow(command.workflow_id, self.store)
                await wf.prepare_retry()  # refused at once, in one sentence, unless retryable
                self.runner.submit(wf)
                return self._ok(rid, wf)
            case c.ResumeCommand():
                # Refused in one sentence (invalid_input naming the field; the workflow stays
                # PAUSED) unless the data fits the step's input model; then committed ACTIVE.
                wf = await self.builder.resume(self.store, command.workflow_id, command.data)
                self.runner.submit(wf)
                return self._ok(rid, wf)
            case c.GetCommand():
                return await self.get(command.workflow_id, rid, journal=command.journal)
            case c.ListCommand():
                since, until = command.window()
                try:
                    records, more = await self.store.list_page(
                        status=[s.value for s in command.status] if command.status else None,
                        workflow_type=command.workflow_type,
                        created_after=since,
                        created_before=until,
                        limit=command.limit,
                        cursor=command.cursor,
                    )
                except ValueError:  # the limit is the model's: only a cursor can be refused
                    raise c.CommandError("invalid_command", command.bad_cursor()) from None
                return ok_reply(
                    rid, workflows=[await self._row(r) for r in records], next_cursor=more
                )
            case c.PinsCommand() | c.SetInputCommand():
                return self._pins(command)
            case c.StatusCommand():
                return ok_reply(
                    rid,
                    device_id=self.device_id,
                    pid=os.getpid(),
                    running=self.runner.running,
                    queued=self.runner.queued,
                    counts=await self.store.count_by_status(),
                    mqtt_connected=self.mqtt_connected(),
                    workflow_types=self.builder.workflow_types,
                    **self.clock_status(),
                )
            case c.SchedulesCommand():
                return ok_reply(rid, schedules=await self.schedule_rows(), **self.clock_status())
        raise c.CommandError(
            "unknown_command", f"Unsupported command {command!r}."
        )  # pragma: no cover

    def clock_status(self) -> dict[str, Any]:
        """``clock_synchronized`` and ``timers_waiting_on_sync`` for a status reply (a count
        that cannot be taken is 0: the status never fails for it)."""
        try:
            waiting = int(self.timers_waiting())
        except Exception:
            log.warning("status: the timers waiting on the clock cannot be counted", exc_info=True)
            waiting = 0
        return {"clock_synchronized": self.clock.synchronized(), "timers_waiting_on_sync": waiting}

    async def schedule_rows(self) -> list[dict[str, Any]]:
        """Each schedule's next fire time and last run (see :func:`agent._scheduler.schedule_rows`)."""
        from agent._scheduler import schedule_rows

        return await schedule_rows(self.schedules, self.store, self.clock, self.checked_at())

    async def fire_schedule(self, schedule: ScheduleConfig, slot: str) -> dict[str, Any]:
        """Start ``schedule``'s workflow for the slot ``slot`` (a slot key) as a start command:
        its request id names the schedule and the slot, so a repeat gets the first answer, and
        the fire is recorded in the transaction that creates the workflow."""
        from agent._commands import ScheduledStart

        command = ScheduledStart(
            request_id=f"schedule:{schedule.name}:{slot}",
            workflow_type=schedule.workflow_type,
            data=dict(schedule.data),
            fire=(schedule.name, slot),
        )
        return await self.execute(command)

    async def waiting_input(self, rec: InstanceRecord) -> dict[str, Any] | None:
        """What a PAUSED workflow waits for (``step``, ``schema``: the input model's JSON Schema,
        ``timeout``, ``approve_with``), or None for any other status."""
        if rec.status is not WorkflowStatus.PAUSED:
            return None
        wf = await self.builder.load_workflow(rec.id, self.store)
        return self.builder.waiting_input(wf)

    async def _row(self, rec: InstanceRecord) -> dict[str, Any]:
        """A row of ``list``: the record's summary; for a PAUSED one also the step and the names
        of the input fields it waits for."""
        row: dict[str, Any] = dict(rec.summary())
        try:
            waiting = await self.waiting_input(rec)
        except Exception:  # its stored definition no longer loads: `show` says why; list goes on
            log.warning("list: cannot say what workflow %s waits for", rec.id, exc_info=True)
            waiting = None
        if waiting is not None:
            row["waiting_input"] = {"step": waiting.get("step"), "fields": input_fields(waiting)}
        return row

    async def cancel(self, workflow_id: str, reason: str | None) -> Workflow:
        """Cancel a workflow: a driven one is told, a waiting one is handed to the driver (so the
        reply does not wait for the rollback); a status it does not apply to is refused."""
        wf = await self.builder.load_workflow(workflow_id, self.store)
        reason = reason or "cancelled on request"
        if wf.is_running or not can_cancel(wf.status):
            await wf.cancel(reason)  # handed to the driver, or refused in one sentence
        else:
            wf.request_cancel(reason)
            self.runner.submit(wf)
        return wf

    def _pins(self, command: Any) -> dict[str, Any]:
        from agent._commands import CommandError, SetInputCommand

        board = self.board
        if board is None:
            raise CommandError("no_hardware", "This agent has no hardware section in its config.")
        if isinstance(command, SetInputCommand):
            from hardware import HardwareError

            try:
                # The value as sent: the board parses it strictly (bool("false") would be True).
                board.set_input(command.device, command.value)
            except HardwareError as exc:
                raise CommandError("invalid_command", str(exc)) from None
            return ok_reply(command.request_id, pins=board.snapshot())
        reply = ok_reply(command.request_id, pins=board.snapshot())
        if command.history and board.is_mock:
            # Mock pins record every state they took: the desktop's (and the tests') pin log.
            reply["history"] = {
                name: [s.state for s in board[name].gpio.pin.states] for name in board
            }
        return reply

    async def _start(self, command: StartCommand) -> dict[str, Any]:
        from agent._commands import CommandError, ScheduledStart

        rid = command.request_id
        self.builder.definition(command.workflow_type)  # unknown types fail before anything else
        self.builder.validate_data(command.workflow_type, command.data)
        # Without a caller-chosen id, the id is derived from the request id: a repeat after a
        # crash between commit and reply still finds the same workflow.
        wid = command.workflow_id or str(uuid.uuid5(_REQUEST_NS, rid))
        reply = ok_reply(rid, workflow_id=wid, status="ACTIVE", workflow_type=command.workflow_type)
        stored = {**reply, COMMAND_HASH: command_hash(command)}
        if isinstance(command, ScheduledStart):
            stored[SCHEDULE_FIRE] = list(command.fire)  # recorded with the instance, then dropped
        wf = await self.builder.create_workflow(
            command.workflow_type,
            command.data,
            store=self.store,
            workflow_id=wid,
            saga_mode=command.saga,
            request=(rid, stored),
        )
        if wf.workflow_type != command.workflow_type:
            raise CommandError(
                "invalid_command",
                f"Workflow id {wid} already belongs to a {wf.workflow_type} workflow.",
            )
        # The reply stored with a new instance is this one exactly (a repeat gets it verbatim); an
        # existing workflow id answers with that workflow's status.
        answer = {**reply, "status": wf.status.value}
        if not wf.status.is_terminal and not wf.is_running:
            self.runner.submit(wf)
        return answer

    @staticmethod
    def _ok(request_id: str | None, wf: Workflow, **extra: Any) -> dict[str, Any]:
        return ok_reply(request_id, workflow_id=wf.id, status=wf.status.value, **extra)

    async def get(
        self, workflow_id: str, request_id: str | None = None, *, journal: bool = True
    ) -> dict[str, Any]:
        rec = await self.store.load_instance(workflow_id)
        if rec is None:
            raise WorkflowNotFound(workflow_id)
        reply = ok_reply(
            request_id,
            **rec.summary(),
            state=rec.state,
            saga=bool(rec.progress.get("saga")),
            completed_steps=rec.progress.get("completed", []),
            compensated_steps=rec.progress.get("compensated", []),
            compensation_failed=rec.progress.get("compensation_failed", []),
        )
        waiting = await self.waiting_input(rec)
        if waiting is not None:
            reply["waiting_input"] = waiting
        live = self.builder.live(workflow_id)
        if live is not None and live.waiting_for:
            reply["waiting_for"] = live.waiting_for
        if journal:
            reply["journal"] = [j.to_json() for j in await self.store.journal(workflow_id)]
        return reply
