"""Logging for journald (plain lines) or JSON lines; one line per transition and per problem."""

from __future__ import annotations

import json
import logging
import sys
import time

_TEXT = "%(levelname)s %(name)s: %(message)s"

#: The levels ``--log-level``, ``EDGESAGA_LOG_LEVEL`` and ``logging.level`` accept (any case).
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def check_level(level: str) -> str:
    """``level`` in upper case; :class:`ValueError` with a sentence for anything but :data:`LEVELS`."""
    upper = level.strip().upper()
    if upper not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}.")
    return upper


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger on stderr (journald captures it under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, check_level(level)))
