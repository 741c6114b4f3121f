"""The local control socket: newline-delimited JSON over a Unix socket (mode 0660).

A request is ``{"command": "start", ...fields of that command}``; the reply is one JSON line.
Every command goes to ``handle_raw`` (:meth:`agent._control.Control.handle_local`: the MQTT
commands and ``pins``, ``set_input`` and ``status``), with the line as it came, so the same
mistake gets the same reply as over MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent._messages import dumps, error_reply

log = logging.getLogger("edgesaga.control")

Extra = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 1024 * 1024


class ControlServer:
    """Serves commands on a Unix socket until closed."""

    def __init__(
        self,
        *,
        path: Path,
        handle_raw: Callable[[str, bytes], Awaitable[tuple[dict[str, Any], str | None]]],
        extra: dict[str, Extra] | None = None,
    ) -> None:
        self.path = Path(path)
        self._handle_raw = handle_raw
        self._extra = extra or {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(
                    f"{self.path} exists and is not a socket; remove it or change control_socket."
                )
            self.path.unlink()  # stale: the database lock proves no other agent runs
        self._server = await asyncio.start_unix_server(
            self._client, path=str(self.path), limit=MAX_LINE
        )
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    reply = error_reply(None, "payload_too_large", "The request line is too long.")
                    writer.write(dumps(reply).encode() + b"\n")
                    await writer.drain()
                    break
                if not line:
                    break
                reply = await self._one(line)
                writer.write(dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, line: bytes) -> dict[str, Any]:
        from agent._commands import invalid_json

        line = line.rstrip(b"\r\n")  # the payload as MQTT would carry it
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a huge integer, nesting
            return invalid_json(exc).reply()
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return error_reply(None, "invalid_command", 'A request is {"command": "...", ...}.')
        name = req["command"]
        extra = self._extra.get(name)
        if extra is not None:
            try:
                return await extra(req)
            except Exception as exc:
                return error_reply(req.get("request_id"), "invalid_command", str(exc))
        try:
            # The line as it came (its "command" field matches the name): sizes and sentences
            # are those MQTT gives for the same payload.
            reply, _ = await self._handle_raw(name, line)
        except Exception:
            log.exception("the command handler failed on a %s command", name)
            return error_reply(
                req.get("request_id") if isinstance(req.get("request_id"), str) else None,
                "internal_error",
                "The agent failed to handle this command; see its log.",
            )
        return reply


def request(path: Path, command: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """Send one command to a running agent (blocking; for the CLI). Raises ``OSError`` when no agent
    listens on ``path``, and ``ConnectionError`` (never ``BrokenPipeError``, which the CLI keeps
    for its own stdout) when the agent drops the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        buf = b""
        try:
            s.sendall(dumps({"command": command, **fields}).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except BrokenPipeError:
            buf = b""
    if not buf:
        raise ConnectionError(f"The agent at {path} closed the connection without a reply.")
    reply: dict[str, Any] = json.loads(buf)
    return reply


def agent_listening(path: Path) -> bool:
    """True when an agent accepts connections on ``path``, False when nothing listens there.

    Raises ``PermissionError`` when this user may not open the socket (or reach its directory):
    an agent may well be running, so "no agent" would be the wrong answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except PermissionError:
            raise
        except OSError:
            return False
    return True
