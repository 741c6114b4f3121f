"""Start-up of the ``edgesaga`` process: the cyclic garbage collector waits until it is ready.

Importing pydantic, gpiozero and our modules and building the models creates tens of thousands of
objects the collector tracks, nearly all of them kept for the life of the process. The collector would walk
them again and again while they are created (about 3 % of the instructions to READY). So the
command turns it off first thing and turns it back on once the agent is ready (or, for a one-shot
command, before the command runs), after ``gc.freeze()``: what start-up made is moved out of the
collector's sight for good, so the long-running agent never walks it again either.

No collection runs before the freeze: it would stall the event loop for ~30 ms on this VM (more
on a Pi) to free the ~560 objects of start-up garbage, throw-away classes and their functions,
which hold no files or sockets. They stay, frozen with the rest (the pattern ``gc.freeze``'s
documentation gives).
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


def resume_gc() -> None:
    """Undo :func:`pause_gc`: freeze what exists now and turn the collector on again.

    Does nothing unless :func:`pause_gc` turned the collector off, so code that embeds the agent
    and manages the collector itself is left alone."""
    global _paused
    if not _paused:
        return
    _paused = False
    gc.freeze()
    gc.enable()
