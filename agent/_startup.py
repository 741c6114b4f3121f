"""Start-up of the ``edgesaga`` process: the cyclic garbage collector waits until it is ready.

Importing pydantic, gpiozero and our modules and building the models allocates hundreds of
thousands of objects that live as long as the process, and very few cycles to free. The collector
would walk them again and again while they are created (about 3 % of the instructions to READY).
So the command turns it off first thing, and turns it back on once the agent is ready (or, for a
one-shot command, before the command runs): one full collection frees what start-up left, and
``gc.freeze()`` moves what survives, the modules, classes and models, out of the collector's sight
for good, so the long-running agent does not walk them again either.
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


def resume_gc(*, freeze: bool = True) -> None:
    """Undo :func:`pause_gc`: collect once, optionally freeze the survivors, and turn it on again.

    Does nothing unless :func:`pause_gc` turned the collector off, so code that embeds the agent
    and manages the collector itself is left alone."""
    global _paused
    if not _paused:
        return
    _paused = False
    gc.collect()
    if freeze:
        gc.freeze()
    gc.enable()
