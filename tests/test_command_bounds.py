"""Hostile command payloads that once escaped parse_command or the socket server (issue 10).

Each case is a payload the fuzzers found: it must become one error reply with a documented
code and a short, one-line message."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent._commands import ERROR_CODES, CommandError, ListCommand, parse_command
from agent._socket import ControlServer
from agent._status import WorkflowStatus

HUGE_INT = b"9" * 5000  # more digits than int() converts to text


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"request_id": "r", "workflow_id": "w", "reason": ' + HUGE_INT + b"}", "invalid_json"),
        (b'{"command": ' + HUGE_INT + b', "request_id": "r"}', "invalid_json"),
        (b"[" * 20000, "invalid_json"),
    ],
)
def test_payloads_the_json_parser_rejects_are_invalid_json(payload: bytes, code: str) -> None:
    with pytest.raises(CommandError) as err:
        parse_command("cancel", payload)
    assert err.value.code == code


@pytest.mark.parametrize("field", ["\n", "a\r\nERROR forged line", "x" * 60_000])
def test_field_names_are_echoed_on_one_line_and_cut_short(field: str) -> None:
    payload = json.dumps({"request_id": "r", "workflow_id": "w", field: 1})
    with pytest.raises(CommandError) as err:
        parse_command("cancel", payload)
    assert err.value.code == "invalid_command"
    assert "\n" not in err.value.message
    assert "\r" not in err.value.message
    assert len(err.value.message) < 400


def test_a_mismatched_command_field_is_cut_short() -> None:
    payload = json.dumps({"request_id": "r", "command": "y" * 60_000})
    with pytest.raises(CommandError) as err:
        parse_command("list", payload)
    assert err.value.code == "invalid_command"
    assert len(err.value.message) < 400


def test_unknown_command_names_are_cut_short() -> None:
    with pytest.raises(CommandError) as err:
        parse_command("z" * 60_000 + "\n", b'{"request_id": "r"}')
    assert err.value.code == "unknown_command"
    assert "\n" not in err.value.message
    assert len(err.value.message) < 400


def test_list_takes_statuses_as_their_json_strings() -> None:
    cmd = parse_command("list", json.dumps({"request_id": "r", "status": ["ACTIVE", "PAUSED"]}))
    assert isinstance(cmd, ListCommand)
    assert cmd.status == [WorkflowStatus.ACTIVE, WorkflowStatus.PAUSED]
    with pytest.raises(CommandError) as err:
        parse_command("list", json.dumps({"request_id": "r", "status": ["SLEEPING"]}))
    assert err.value.code == "invalid_command"


async def test_the_socket_server_answers_unparseable_lines(tmp_path: Path) -> None:
    async def handle_raw(name: str, payload: bytes) -> tuple[dict[str, Any], str | None]:
        raise AssertionError("an unparseable line must not reach the handler")

    server = ControlServer(path=tmp_path / "s.sock", handle_raw=handle_raw)
    await server.start()
    try:
        for line in (b"[" * 20000, b'{"command": "list", "limit": ' + HUGE_INT + b"}"):
            reader, writer = await asyncio.open_unix_connection(tmp_path / "s.sock", limit=2**20)
            writer.write(line + b"\n")
            await writer.drain()
            reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
            writer.close()
            assert reply["ok"] is False
            assert reply["error"]["code"] in ERROR_CODES
            assert reply["error"]["code"] == "invalid_json"
    finally:
        await server.close()
