"""libfaketime for a whole agent process: where the library is, and a clock a test moves.

``faketime_lib`` is a fixture (import it into a test module) giving the path of
``libfaketime.so.1``; without the library the test fails with a sentence saying how to install
it (``scripts/test`` installs it), never a skip. :class:`FakeTime` writes the offset file the
library reads (``FAKETIME_TIMESTAMP_FILE`` with ``FAKETIME_NO_CACHE=1``): the process's wall
clock is the real one plus that offset, so a test sets it to any time and moves it either way
while the process runs. ``FAKETIME_DONT_FAKE_MONOTONIC=1`` leaves the monotonic and boot-time
clocks real, as on a board whose wall clock NTP steps.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

LIBRARY = "libfaketime.so.1"
INSTALL = (
    "libfaketime is not installed; run scripts/test (it installs it) or "
    "`apt-get install libfaketime`."
)


def find_faketime() -> Path | None:
    """The path of libfaketime.so.1 (the Debian package's, or anywhere under /usr/lib), or None."""
    if shutil.which("dpkg") is not None:
        listed = subprocess.run(
            ["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=False
        )
        for line in listed.stdout.splitlines():
            if line.endswith("/" + LIBRARY) and Path(line).is_file():
                return Path(line)
    for pattern in (
        f"/usr/lib/*/faketime/{LIBRARY}",
        f"/usr/lib/faketime/{LIBRARY}",
        f"/usr/local/lib/faketime/{LIBRARY}",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    return None


@pytest.fixture(scope="session")
def faketime_lib() -> Path:
    """The path of libfaketime.so.1; a failure naming how to install it when it is missing."""
    path = find_faketime()
    if path is None:
        pytest.fail(INSTALL, pytrace=False)
    return path


class FakeTime:
    """The offset file of one faked process: :meth:`set` its wall clock to a time."""

    def __init__(self, lib: Path, directory: Path) -> None:
        self.lib = lib
        self.file = directory / "faketime.rc"

    def set(self, when: datetime) -> None:
        """From now on the process's wall clock reads ``when`` (an aware datetime), then runs on."""
        offset = when.timestamp() - time.time()
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{offset:+.3f}\n", encoding="ascii")
        tmp.replace(self.file)  # the library never reads a half-written file

    def env(self) -> dict[str, str]:
        """The environment variables that fake the wall clock of a process started with them."""
        return {
            "LD_PRELOAD": str(self.lib),
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_RESET": "1",
        }
