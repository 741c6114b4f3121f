"""Workflow definitions bundled with edgesaga (YAML beside their step modules), each with the part
of ``edgesaga demo`` that runs it (``workflows/<name>/demo.py``).

:data:`DIRECTORY` is where the bundled definitions live. Only the top of the agent (the CLI and
the service) reads it and hands it to the loader, so the layers below never import this package.
"""

from pathlib import Path

#: The directory of the bundled definitions, searched like any other definitions directory.
DIRECTORY = Path(__file__).parent
