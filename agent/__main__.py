"""The ``edgesaga`` command (and ``python -m agent``): process-wide defaults, then the CLI."""

from __future__ import annotations

import os
import sys

from agent._startup import pause_gc


def main() -> int:
    pause_gc()  # until the agent is ready (or the command starts): see agent/_startup.py
    # When it builds its first model, pydantic looks for plugins by reading the entry points of
    # every installed distribution: thousands of stat() calls, a visible part of the agent's
    # start-up (more so on an SD card), for plugins the agent does not use. Set
    # PYDANTIC_DISABLE_PLUGINS (even empty) in the environment to decide otherwise.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from agent._cli import main as cli

    return cli()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
