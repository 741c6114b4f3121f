"""``edgesaga run``: the long-running agent.

Order at start: open the store (an exclusive lock: one agent per database) → outputs to their safe
values → interrupted attempts marked (one pass, ``_recovery.mark_interrupted_attempts``) → control
socket → READY=1 → the unfinished workflows fed to the runner a page at a time
(``_recovery.Feeder``) and MQTT, both in the background (the agent works offline) → the first
retention prune, once the feed is under way.
On SIGTERM/SIGINT: STOPPING=1, stop taking work, give running steps ``grace_period`` seconds to
reach a checkpoint (a step still running then is left for recovery, counted as interrupted),
outputs safe, ``offline`` published, store closed, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from agent._clock import SystemClock
from agent._config import AgentConfig
from agent._control import Control
from agent._engine import WorkflowBuilder
from agent._errors import DiskFull
from agent._messages import Alert, alert, error_reply
from agent._recovery import Feeder, mark_interrupted_attempts
from agent._runner import Runner
from agent._sdnotify import Notifier, watchdog_loop
from agent._socket import ControlServer
from agent._startup import resume_gc
from agent._status import RESUMABLE, WorkflowStatus
from agent._store import SQLiteStore, iso
from agent._validate import load_definitions
from workflows import DIRECTORY as BUNDLED  # the service hands it down to the loader

if TYPE_CHECKING:
    from agent._scheduler import Scheduler

log = logging.getLogger("edgesaga.agent")

#: Seconds between two disk-full alerts while the disk stays full (the first goes out at once).
DISK_ALERT_INTERVAL = 600.0
#: Rows a retention slice deletes in one transaction: a commit or a watchdog ping waits at most
#: one slice behind it.
PRUNE_SLICE_ROWS = 200
#: After a prune of at least this many workflows the freed pages go back to the file system
#: (``SQLiteStore.reclaim``); after a smaller one the WAL is only folded back.
RECLAIM_AFTER = 1000
#: Pages one reclaim slice gives back (1 KiB each): on a busy disk 2,000 took up to a second, which
#: the watchdog's ping would wait behind.
RECLAIM_SLICE_PAGES = 500


class Agent:
    """The agent process: owns the store, the board, the runner, the control socket and MQTT.

    Every background task belongs to one TaskGroup in :meth:`run`.
    """

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.store: SQLiteStore | None = None
        self.board: Any = None
        self.builder: WorkflowBuilder | None = None
        self.runner = Runner(max_concurrent=config.max_concurrent)
        self.control: Control | None = None
        self.link: Any = None
        self._stop = asyncio.Event()
        self.exit_code = 0
        self._disk_alerted: float | None = None  # time.monotonic() of the last disk-full alert
        self._disk_alert_task: asyncio.Task[None] | None = None
        self._paused = 0  # PAUSED workflows at the last count (the status text says it)
        self.feeder: Feeder | None = None  # recovery's feed to the runner, after READY
        # The one clock of the agent: its timers, its schedules and its status read it.
        self.clock = SystemClock.from_config(config.clock)
        self.scheduler: Scheduler | None = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    # -- start-up ----------------------------------------------------------------------------------
    def _open_board(self) -> Any:
        hw = self.config.hardware
        if hw is None:
            return None
        from hardware import Board

        board = Board.from_config(hw)
        # Before recovery: whatever ran before a crash is switched off first.
        applied = board.safe_state()
        log.info(
            "outputs set to their safe values: %s",
            ", ".join(f"{name}={value}" for name, value in applied.items()) or "(no outputs)",
        )
        return board

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if cfg.hardware is not None:
            from hardware import Board

            # The pin factory first (a board without devices claims no pin): a config written for
            # a Pi fails here on a desktop, before the database or its directory is created.
            Board(devices={}, pin_factory=cfg.hardware.pin_factory).close()
        self.store = SQLiteStore(cfg.database, disk_full_grace=cfg.disk_full_grace)
        self.store.add_disk_full_listener(self._on_disk_full)
        await self.store.open()  # DatabaseLocked when another agent drives this file
        try:
            self.board = self._open_board()
            self.builder = WorkflowBuilder(
                hardware=self.board, max_state_bytes=cfg.max_state_bytes, clock=self.clock
            )
            # Loaded as `edgesaga validate --config` checks them (python_path, yaml_limits, ...).
            for definition in load_definitions(cfg, bundled=BUNDLED):
                self.builder.add_definition(definition)
            if cfg.homeassistant.enabled:
                from agent._homeassistant import check_exposed

                check_exposed(cfg.homeassistant, self.builder.workflow_types)
            self.control = Control(
                builder=self.builder,
                store=self.store,
                runner=self.runner,
                max_payload=cfg.mqtt.max_payload,
                board=self.board,
                device_id=cfg.device_id,
                mqtt_connected=lambda: None if self.link is None else bool(self.link.connected),
                clock=self.clock,
                schedules=cfg.schedules,
                timers_waiting=self._timers_waiting,
                checked_at=lambda: None if self.scheduler is None else self.scheduler.checked_at,
            )
            # Before READY only what does not grow with the number of unfinished workflows: one
            # pass marks the cut attempts, one count; the feed itself starts after READY.
            interrupted = await mark_interrupted_attempts(self.store)
            counts = await self.store.count_by_status()
            unfinished = sum(counts.get(s.value, 0) for s in RESUMABLE)
            self.feeder = Feeder(self.builder, self.store, self.runner, backlog=unfinished)
            await self._arm_pauses()  # PAUSED workflows are no feeder's: re-arm their timeouts
            log.info(
                "agent %s: %d workflow type(s) loaded, %d workflow(s) recovered "
                "(%d interrupted attempt(s)); they resume once the agent is ready, oldest first",
                cfg.device_id,
                len(self.builder.workflow_types),
                unfinished,
                interrupted,
            )
            server = ControlServer(
                path=cfg.socket_path,
                handle_raw=self.control.handle_local,
                extra={"_block_loop": self._block_loop},
            )
            await server.start()
            try:
                await self._start_timers()  # before READY: recovery parks DELAYs with it
                await self._serve()
            finally:
                await server.close()
        finally:
            if self.builder is not None:
                with contextlib.suppress(Exception):
                    await self.builder.stop_timers()
            if self.board is not None:
                with contextlib.suppress(Exception):
                    self.board.safe_state()
                self.board.close()
            await self.store.close()
        log.info("agent stopped")
        return self.exit_code

    async def _serve(self) -> None:
        cfg = self.config
        async with asyncio.TaskGroup() as tg:
            tasks: list[asyncio.Task[Any]] = [
                tg.create_task(self.runner.serve(), name="runner"),
                tg.create_task(self._retention_loop(), name="retention"),
                tg.create_task(self._status_loop(), name="status"),
            ]
            tasks.extend(self._approve_buttons(tg))
            if cfg.schedules:
                from agent._scheduler import Scheduler  # only an agent with schedules loads it

                assert self.store is not None
                assert self.control is not None
                self.scheduler = Scheduler(
                    cfg.schedules,
                    store=self.store,
                    clock=self.clock,
                    fire=self.control.fire_schedule,
                )
                tasks.append(tg.create_task(self.scheduler.run(), name="schedules"))
            if self.board is not None and cfg.hardware is not None and cfg.hardware.simulate:
                tasks.append(
                    tg.create_task(self.board.simulate(cfg.hardware.simulate), name="simulate")
                )
            await self._count_paused()
            self.notifier.ready(self._status_text())
            log.info("agent %s ready", cfg.device_id)
            # The watchdog starts after READY: created before it, its first ping could run during
            # the await above and reach systemd before READY=1 (seen on a loaded machine).
            interval = self.notifier.watchdog_interval()
            if interval:
                tasks.append(
                    tg.create_task(
                        watchdog_loop(self.notifier, self._healthy, interval), name="watchdog"
                    )
                )
            resume_gc(collect=True)  # off since exec when started by the `edgesaga` command
            if self.feeder is not None:
                tasks.append(tg.create_task(self._feed(self.feeder), name="recovery"))
            # The MQTT link is built after READY: the agent works offline, so connecting never was
            # part of being ready, and its module (with paho) is a large part of start-up. Nothing
            # runs between READY and here (no await), so no task sees the agent without its link.
            link_task = None
            if cfg.mqtt.enabled:
                from agent._mqtt import MqttLink

                assert self.store is not None
                assert self.control is not None
                self.link = MqttLink(
                    settings=cfg.mqtt,
                    device_id=cfg.device_id,
                    store=self.store,
                    handler=self.control.handle_raw,
                    homeassistant=self._homeassistant(),
                )
                link_task = tg.create_task(self.link.run(), name="mqtt")
            await self._stop.wait()

            # -- graceful shutdown --
            self.notifier.stopping("stopping: letting running steps reach a checkpoint")
            log.info("stopping: grace period %.1f s", cfg.grace_period)
            cut = await self.runner.stop(cfg.grace_period)
            if cut:
                log.warning("%d workflow(s) cut short at shutdown; recovery resumes them", cut)
            if self.board is not None:
                self.board.safe_state()
            for t in tasks:
                t.cancel()
            if self._disk_alert_task is not None:
                self._disk_alert_task.cancel()
            if link_task is not None:
                link_task.cancel()  # publishes offline and disconnects

    def _homeassistant(self) -> Any:
        """Home Assistant discovery when the config enables it (DESIGN §12), else None."""
        cfg = self.config
        if not cfg.homeassistant.enabled:
            return None
        from importlib.metadata import PackageNotFoundError, version

        from agent._homeassistant import HomeAssistant
        from agent._mqtt import Topics

        try:
            sw_version = version("edgesaga")
        except PackageNotFoundError:
            sw_version = "unknown"
        topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        return HomeAssistant(
            cfg.homeassistant,
            device_id=cfg.device_id,
            base=topics.base,
            availability=topics.availability,
            builder=self.builder,
            store=self.store,
            control=self.control,
            board=self.board,
            sw_version=sw_version,
        )

    # -- HUMAN_INPUT: pause timeouts and approve_with buttons ----------------------------------------
    async def _arm_pauses(self) -> None:
        """After recovery: a PAUSED workflow's timeout runs again (for its full length), and one
        that runs out fails or continues (its step's on_timeout) on the runner."""
        assert self.builder is not None
        assert self.store is not None
        builder, store, runner = self.builder, self.store, self.runner
        expiring: set[asyncio.Task[None]] = set()

        async def expire(workflow_id: str) -> None:
            try:
                wf = await builder.expire_pause(store, workflow_id)
            except Exception:
                log.exception(
                    "the pause of workflow %s timed out, but ending it failed", workflow_id
                )
                return
            if wf is not None:
                runner.submit(wf)

        def timed_out(workflow_id: str) -> None:  # called on the loop by the builder's timer
            task = asyncio.get_running_loop().create_task(expire(workflow_id))
            expiring.add(task)
            task.add_done_callback(expiring.discard)

        builder.on_pause_timeout = timed_out
        await builder.rearm_pauses(store)

    def _approve_buttons(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """One task per device named by a loaded HUMAN_INPUT step's ``approve_with``: a press
        resumes the oldest PAUSED workflow waiting on it, with the input model's defaults."""
        assert self.builder is not None
        board = self.board
        devices = sorted(
            {
                step.spec.approve_with
                for wt in self.builder.workflow_types
                for step in self.builder.definition(wt).steps
                if step.spec.type == "HUMAN_INPUT" and step.spec.approve_with
            }
        )
        missing = [d for d in devices if board is None or d not in board]
        for device in missing:  # `edgesaga validate --config` reports it; resume still works
            log.info("approve_with names %r, not a device of this board: no press resumes", device)
        return [
            tg.create_task(self._watch_button(d), name=f"approve-{d}")
            for d in devices
            if d not in missing
        ]

    async def _watch_button(self, device: str) -> None:
        async with self.board[device].edges() as presses:
            async for edge in presses:
                if not edge.value:  # released: no approval
                    continue
                try:
                    await self._approve(device)
                except Exception:  # a press must never take the agent down
                    log.exception(
                        "%s pressed, but resuming the workflow waiting on it failed", device
                    )

    async def _approve(self, device: str) -> None:
        """A press of ``device``: resume the oldest workflow PAUSED on it with data ``{}`` (the
        input model's defaults), through the one operator path (logged and deduplicated like
        any resume command)."""
        import uuid

        from agent._commands import ResumeCommand

        assert self.builder is not None
        assert self.control is not None
        waiting = self.builder.paused_waiting_on(device)
        if not waiting:
            log.info("%s pressed, but no workflow waits on it", device)
            return
        command = ResumeCommand(request_id=f"{device}-{uuid.uuid4()}", workflow_id=waiting[0])
        reply = await self.control.execute(command)
        log.info("%s pressed: resume %s: %s", device, waiting[0], reply)

    # -- a full disk ---------------------------------------------------------------------------------
    def _on_disk_full(self, error: DiskFull) -> None:
        """A write found the disk full: an alert now, straight to the broker (the outbox is in the
        database it cannot write), then at most one every DISK_ALERT_INTERVAL while it lasts."""
        now = time.monotonic()
        if self._disk_alerted is not None and now - self._disk_alerted < DISK_ALERT_INTERVAL:
            return
        self._disk_alerted = now
        grace = self.config.disk_full_grace
        message = (
            f"{error} Workflows wait for space; the outputs they hold go to their safe values "
            f"after {grace:g} s (disk_full_grace). Free space on that disk: work then goes on."
        )
        log.error(message)
        if not self.config.mqtt.enabled:
            return
        # seq None: not numbered, it never was in the outbox
        payload = alert(
            "disk_full", message, at=iso(time.time()), database=str(self.config.database)
        )
        if self._disk_alert_task is None or self._disk_alert_task.done():
            self._disk_alert_task = asyncio.get_running_loop().create_task(
                self._send_disk_alert(payload), name="disk-full-alert"
            )

    async def _send_disk_alert(self, payload: Alert) -> None:
        """Publish the alert: at once if the link is connected (even if a write has succeeded
        since, so a disk that filled up is always reported), else once it connects, for as long
        as the disk stays full."""
        assert self.store is not None
        while True:
            if self.link is not None and await self.link.publish_alert(payload):
                return
            if not self.store.disk_full:
                return
            await asyncio.sleep(1.0)

    # -- background loops --------------------------------------------------------------------------
    async def _healthy(self) -> bool:
        assert self.store is not None
        return await self.store.ping()

    async def _count_paused(self) -> None:
        """How many workflows are PAUSED (waiting for input), for the status text."""
        assert self.store is not None
        counts = await self.store.count_by_status([WorkflowStatus.PAUSED.value])  # by index
        self._paused = counts.get(WorkflowStatus.PAUSED.value, 0)

    def _status_text(self) -> str:
        paused = self._paused
        if self.link is not None:
            mqtt = ", mqtt up" if self.link.connected else ", mqtt down"
        else:  # at READY the link is not built yet: it is down
            mqtt = ", mqtt down" if self.config.mqtt.enabled else ""
        # queued: waiting in the runner, and still in the store for recovery to hand over
        queued = self.runner.queued + (self.feeder.backlog if self.feeder is not None else 0)
        if self.clock.synchronized():
            clock = ", clock synced"
        else:
            clock = f", clock not synced ({self._timers_waiting()} timer(s) wait for it)"
        return f"running {self.runner.running}, queued {queued}, paused {paused}{mqtt}{clock}"

    async def _start_timers(self) -> None:
        """The timer service of durable DELAYs, on the agent's one clock: started after
        recovery has marked the cut attempts, before READY."""
        assert self.builder is not None
        assert self.store is not None
        await self.builder.start_timers(self.store, self.runner.submit, self.clock)

    def _timers_waiting(self) -> int:
        """How many durable timers wait for the clock's sync (0 without a timer service)."""
        timers = None if self.builder is None else self.builder.timers
        if timers is None:
            return 0
        try:
            return timers.count_waiting_on_sync()
        except Exception:
            log.warning("status: the timers waiting on the clock cannot be counted", exc_info=True)
            return 0

    async def _status_loop(self) -> None:
        last = ""
        while True:
            with contextlib.suppress(Exception):  # a store that cannot be read keeps the last count
                await self._count_paused()
            text = self._status_text()
            if text != last:
                self.notifier.status(text)
                last = text
            await asyncio.sleep(2.0)

    async def _feed(self, feeder: Feeder) -> None:
        try:
            await feeder.run()
        except Exception:
            # What was not handed over stays ACTIVE in the store: the next start resumes it.
            log.exception("recovery: feeding the unfinished workflows failed; restart the agent")

    async def _retention_loop(self) -> None:
        r = self.config.retention
        assert self.store is not None
        if self.feeder is not None:
            # Not before recovery is under way: the first prune never delays the first workflows.
            await self.feeder.first_page.wait()
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("retention: pruning failed; trying again at the next interval")
            await asyncio.sleep(r.interval)

    async def prune(self) -> list[str]:
        """Prune finished workflows beyond the retention limits and clear their state topics."""
        r = self.config.retention
        assert self.store is not None
        # In slices of PRUNE_SLICE_ROWS, each its own short transaction: workflow commits and the
        # watchdog's ping go between them.
        ids = await self.store.prune(
            max_age=r.max_age_days * 86400 if r.max_age_days else None,
            max_finished=r.max_finished,
            slice_rows=PRUNE_SLICE_ROWS,
        )
        if ids:
            log.info("retention: pruned %d finished workflow(s)", len(ids))
            if len(ids) >= RECLAIM_AFTER:
                # the freed pages back to the disk, in slices too
                await self.store.reclaim(max_pages=RECLAIM_SLICE_PAGES)
            else:
                await self.store.checkpoint()
            if self.link is not None:
                await self.link.clear_state(ids)
        return ids

    # -- test hooks ---------------------------------------------------------------------------------
    async def _block_loop(self, req: dict[str, Any]) -> dict[str, Any]:
        """Test hook (only with EDGESAGA_TEST_HOOKS=1): block the event loop to prove the watchdog
        stops pinging when the loop is wedged."""
        if os.environ.get("EDGESAGA_TEST_HOOKS") != "1":
            return error_reply(None, "unknown_command", "Unknown command '_block_loop'.")
        seconds = float(req.get("seconds", 1.0))
        asyncio.get_running_loop().call_soon(time.sleep, seconds)  # deliberately blocking
        return {"ok": True}
