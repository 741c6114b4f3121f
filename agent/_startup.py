"""Start-up of the ``edgesaga`` process: the cyclic garbage collector waits until it is ready.

Importing pydantic, gpiozero and our modules and building the models creates tens of thousands of
objects the collector tracks, nearly all of them kept for the life of the process. The collector
would walk them again and again while they are created (about 3 % of the instructions to READY).
So the command turns it off first thing and turns it back on once the agent is ready (or, for a
one-shot command, before the command runs), after ``gc.freeze()``: what start-up made is moved out
of the collector's sight for good, so the long-running agent never walks it again either.

Start-up also leaves ~560 objects of garbage: classes that a decorator or a C module replaced
(``datetime``'s pure-Python classes, enums that ``socket`` and ``ssl`` convert, pydantic's slotted
dataclasses) with their functions, no files or sockets; about 0.5 MB. The agent collects them once
before freezing (a pause of the event loop just after READY, ~30 ms on this VM); a one-shot command
freezes them with the rest, which costs it nothing.
"""

from __future__ import annotations

import gc

_paused = False


def pause_gc() -> None:
    """Turn the cyclic collector off until :func:`resume_gc` (a no-op when it is already off)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc(*, collect: bool) -> None:
    """Undo :func:`pause_gc`: collect once if ``collect``, freeze what exists, turn it back on.

    Does nothing unless :func:`pause_gc` turned the collector off, so code that embeds the agent
    and manages the collector itself is left alone."""
    global _paused
    if not _paused:
        return
    _paused = False
    if collect:
        gc.collect()
    gc.freeze()
    gc.enable()
