"""Carries out commands (from MQTT or the local socket) against the builder, store and runner.

The command models (:mod:`agent._commands`) are imported by the methods that use them, on the first
command: the agent builds this handler before it reports READY, but needs no command model until a
command arrives, and building them is a noticeable part of start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from agent._engine import Workflow, WorkflowBuilder
from agent._errors import (
    AgentError,
    DiskFull,
    InvalidData,
    InvalidTransition,
    UnknownWorkflowType,
    WorkflowNotFound,
    error_reply,
)
from agent._runner import Runner
from agent._store import COMMAND_HASH, SQLiteStore

if TYPE_CHECKING:
    from agent._commands import Command, StartCommand

log = logging.getLogger("edgesaga.control")

_REQUEST_NS = uuid.UUID("6f1f3c1e-5f0a-4a8e-9a53-7e0d2f1b9c11")


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


class Control:
    """The command handler shared by the MQTT link and the control socket."""

    def __init__(
        self,
        *,
        builder: WorkflowBuilder,
        store: SQLiteStore,
        runner: Runner,
        max_payload: int = 64 * 1024,
        hardware: Any = None,
    ) -> None:
        self.builder = builder
        self.store = store
        self.runner = runner
        self.max_payload = max_payload
        self.hardware = hardware
        self._inflight: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}

    async def handle_raw(
        self, name: str, payload: bytes | str
    ) -> tuple[dict[str, Any], str | None]:
        """Parse and execute; returns ``(reply, reply_to)``. Never raises for bad input."""
        from agent._commands import CommandError, parse_command

        try:
            command = parse_command(name, payload, max_payload=self.max_payload)
        except CommandError as err:
            log.warning("rejected %s command (request %s): %s", name, err.request_id, err.message)
            return err.reply(), err.reply_to
        return await self.execute(command), command.reply_to

    async def execute(self, command: Command) -> dict[str, Any]:
        """Carry out a validated command and return the reply (ok or error). Never raises for a
        failing store: a full disk gets the ``disk_full`` reply, whatever the command."""
        from agent._commands import CancelCommand, ResumeCommand, RetryCommand, StartCommand

        rid = command.request_id
        # The reply of an accepted mutating command is stored with the hash of the command, so
        # an identical repeat (QoS 1 redelivery, a caller's retry) gets it, and a request id
        # reused for another command or body is refused. Refusals are not stored: a corrected
        # command may reuse the id.
        if not isinstance(command, StartCommand | CancelCommand | ResumeCommand | RetryCommand):
            return await self._guarded(command)
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
        try:
            stored = await self.store.lookup_request(rid)
        except Exception as exc:
            return self._store_failed(command, exc)
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

    @staticmethod
    def _store_failed(command: Command, exc: Exception) -> dict[str, Any]:
        rid = command.request_id
        if isinstance(exc, DiskFull):
            log.error("command %s (request %s): %s", command.command, rid, exc)
            return error_reply(rid, "disk_full", str(exc))
        log.error("command %s (request %s): the store failed: %s", command.command, rid, exc)
        return error_reply(
            rid, "internal_error", f"The database could not be read ({exc}); see the agent's log."
        )

    async def _guarded(self, command: Command) -> dict[str, Any]:
        from agent._commands import CommandError

        rid = command.request_id
        try:
            return await self._dispatch(command)
        except CommandError as err:
            return error_reply(rid, err.code, err.message)
        except UnknownWorkflowType as err:
            return error_reply(rid, "unknown_workflow_type", str(err))
        except InvalidData as err:
            return error_reply(rid, "invalid_data", str(err))
        except WorkflowNotFound as err:
            return error_reply(rid, "not_found", str(err))
        except InvalidTransition as err:
            return error_reply(rid, "invalid_transition", str(err))
        except DiskFull as err:
            log.error("command %s (request %s): %s", command.command, rid, err)
            return error_reply(rid, "disk_full", str(err))
        except AgentError as err:
            log.exception("command %s (request %s) failed", command.command, rid)
            return error_reply(rid, "internal_error", str(err))
        except Exception as err:
            log.exception("command %s (request %s) failed unexpectedly", command.command, rid)
            return error_reply(rid, "internal_error", f"{type(err).__name__}: {err}")

    async def _dispatch(self, command: Command) -> dict[str, Any]:
        from agent._commands import (
            CancelCommand,
            CommandError,
            GetCommand,
            ListCommand,
            ResumeCommand,
            RetryCommand,
            StartCommand,
        )

        match command:
            case StartCommand():
                return await self._start(command)
            case CancelCommand():
                wf = await self.builder.load_workflow(command.workflow_id, self.store)
                if wf.is_running:
                    await wf.cancel(command.reason or "cancelled on request")
                else:
                    # Not driven here: hand it to the runner so the reply does not wait for the rollback.
                    if wf.status.value not in ("ACTIVE", "PAUSED"):
                        await wf.cancel()  # raises InvalidTransition with a clear sentence
                    wf.request_cancel(command.reason or "cancelled on request")
                    self.runner.submit(wf)
                return self._ok(command.request_id, wf, cancel_requested=True)
            case RetryCommand():
                wf = await self.builder.load_workflow(command.workflow_id, self.store)
                if wf.status.value not in ("FAILED", "COMPENSATION_FAILED"):
                    raise InvalidTransition(
                        wf.id,
                        wf.status.value,
                        f"Workflow {wf.id} is {wf.status.value}; only FAILED and "
                        "COMPENSATION_FAILED workflows can be retried.",
                    )
                await wf.prepare_retry()
                self.runner.submit(wf)
                return self._ok(command.request_id, wf)
            case ResumeCommand():
                wf = await self.builder.load_workflow(command.workflow_id, self.store)
                raise InvalidTransition(
                    wf.id,
                    wf.status.value,
                    f"Workflow {wf.id} is {wf.status.value}, not PAUSED; only a workflow waiting "
                    "for input (a HUMAN_INPUT step) can be resumed.",
                )
            case GetCommand():
                return await self.get(
                    command.workflow_id, command.request_id, journal=command.journal
                )
            case ListCommand():
                records = await self.store.list_instances(
                    status=[s.value for s in command.status] if command.status else None,
                    workflow_type=command.workflow_type,
                    limit=command.limit,
                )
                return {
                    "request_id": command.request_id,
                    "ok": True,
                    "workflows": [r.summary() for r in records],
                }
        raise CommandError(
            "unknown_command", f"Unsupported command {command!r}."
        )  # pragma: no cover

    async def _start(self, command: StartCommand) -> dict[str, Any]:
        from agent._commands import CommandError

        rid = command.request_id
        self.builder.definition(command.workflow_type)  # unknown types fail before anything else
        self.builder.validate_data(command.workflow_type, command.data)
        # Without a caller-chosen id, the id is derived from the request id: a repeat after a
        # crash between commit and reply still finds the same workflow.
        wid = command.workflow_id or str(uuid.uuid5(_REQUEST_NS, rid))
        reply = {
            "request_id": rid,
            "ok": True,
            "workflow_id": wid,
            "status": "ACTIVE",
            "workflow_type": command.workflow_type,
        }
        wf = await self.builder.create_workflow(
            command.workflow_type,
            command.data,
            store=self.store,
            workflow_id=wid,
            saga_mode=command.saga,
            request=(rid, {**reply, COMMAND_HASH: command_hash(command)}),
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
    def _ok(request_id: str, wf: Workflow, **extra: Any) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "ok": True,
            "workflow_id": wf.id,
            "status": wf.status.value,
            **extra,
        }

    async def get(
        self, workflow_id: str, request_id: str | None = None, *, journal: bool = True
    ) -> dict[str, Any]:
        rec = await self.store.load_instance(workflow_id)
        if rec is None:
            raise WorkflowNotFound(workflow_id)
        reply: dict[str, Any] = {
            "request_id": request_id,
            "ok": True,
            **rec.summary(),
            "state": rec.state,
            "saga": bool(rec.progress.get("saga")),
            "completed_steps": rec.progress.get("completed", []),
            "compensated_steps": rec.progress.get("compensated", []),
            "compensation_failed": rec.progress.get("compensation_failed", []),
        }
        live = self.builder.live(workflow_id)
        if live is not None and live.waiting_for:
            reply["waiting_for"] = live.waiting_for
        if journal:
            reply["journal"] = [j.to_json() for j in await self.store.journal(workflow_id)]
        return reply
