"""Exclusive, FIFO leases on named resources (hardware devices) for running workflows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import NamedTuple


class _Waiter(NamedTuple):
    owner: str
    names: frozenset[str]
    future: asyncio.Future[None]


class LeaseManager:
    """Grants all of a workflow's resources at once, in arrival order.

    A waiter is granted when its resources are free and no earlier waiter wants any of them, so a
    workflow needing ``[pump]`` cannot overtake an earlier one needing ``[pump, valve]`` forever.
    """

    def __init__(self) -> None:
        self._held: dict[str, str] = {}  # resource -> owner
        self._queue: list[_Waiter] = []

    def holder(self, name: str) -> str | None:
        return self._held.get(name)

    def held_by(self, owner: str) -> frozenset[str]:
        return frozenset(n for n, o in self._held.items() if o == owner)

    def waiting(self, owner: str) -> frozenset[str]:
        """What ``owner`` waits for (empty when it does not wait)."""
        for w in self._queue:
            if w.owner == owner:
                return frozenset(n for n in w.names if self._held.get(n) not in (None, owner))
        return frozenset()

    async def acquire(self, owner: str, names: Iterable[str]) -> None:
        wanted = frozenset(names)
        if not wanted or wanted <= self.held_by(owner):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(owner, wanted, fut)
        self._queue.append(waiter)
        self._grant()
        try:
            await fut
        except BaseException:
            if waiter in self._queue:
                self._queue.remove(waiter)
            elif fut.done() and not fut.cancelled():
                self.release(owner)  # granted just as we were cancelled
            self._grant()
            raise

    def release(self, owner: str) -> None:
        for name in [n for n, o in self._held.items() if o == owner]:
            del self._held[name]
        self._grant()

    def _grant(self) -> None:
        blocked: set[str] = set()
        for waiter in list(self._queue):
            free = all(self._held.get(n) in (None, waiter.owner) for n in waiter.names)
            if free and not (waiter.names & blocked):
                for n in waiter.names:
                    self._held[n] = waiter.owner
                self._queue.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_result(None)
            blocked |= waiter.names
