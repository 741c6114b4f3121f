"""Sync step functions run here, on daemon worker threads, so the event loop never blocks.

A thread cannot be killed: a sync step that outlives its timeout keeps its worker until it returns.
Daemon threads make sure such a step never holds up the agent's exit, which a
``ThreadPoolExecutor`` (joined at interpreter exit) would.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("edgesaga.workflow")


class DaemonPool:
    """A growing pool of daemon threads; ``run(fn)`` returns an awaitable of ``fn()``."""

    def __init__(self, *, max_idle: int = 8, name: str = "edgesaga-step") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = 0
        self._threads = 0
        self._max_idle = max_idle
        self._name = name
        self._mutex = threading.Lock()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._mutex:
            if self._idle == 0:
                self._threads += 1
                threading.Thread(
                    target=self._work, name=f"{self._name}-{self._threads}", daemon=True
                ).start()
            else:
                self._idle -= 1
        self._jobs.put((fn, fut, loop))
        return fut

    def _work(self) -> None:
        while True:
            fn, fut, loop = self._jobs.get()
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
                loop.call_soon_threadsafe(_fail, fut, exc)
            else:
                loop.call_soon_threadsafe(_done, fut, result)
            with self._mutex:
                if self._idle >= self._max_idle:
                    self._threads -= 1
                    return
                self._idle += 1


def _done(fut: asyncio.Future[Any], value: Any) -> None:
    if fut.done():
        log.warning(
            "a sync step returned after its timeout or cancel; the late result is discarded"
        )
    else:
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if fut.done():
        log.warning("a sync step raised %r after its timeout or cancel; it is discarded", exc)
    else:
        fut.set_exception(exc)
