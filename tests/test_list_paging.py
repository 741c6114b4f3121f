"""``list`` a page at a time, on every operator path: the CLI without an agent, the CLI through a
running agent's control socket, and MQTT ``cmd/list`` with a real Mosquitto.

Both databases hold the same 250 COMPLETED workflows, made by the real engine in one process (a
few milliseconds apart) before anything reads them; the agent's database is a copy of the other.
Each walk first asks for everything in one page (``limit`` 1000, no cursor) as its oracle, then
pages through with ``limit`` 100 while new workflows are started between pages: the pages are
100, 100 and the rest, together the oracle in order (none twice, none missing), and the new
workflows are in none of them.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from agent import SQLiteStore, WorkflowBuilder
from tests._broker import Broker, unique_prefix
from tests.flows.service.harness import (
    ROOT,
    SERVICE_DEFS,
    AgentProcess,
    agent_process,
    base_env,
    cli,
    poll,
    write_config,
)
from tests.test_operator_paths import DEVICE, Mqtt

pytestmark = pytest.mark.timeout(120)

BUILT = 250
PAGE = 100

#: A page: its workflow ids (newest first) and the cursor of the next one (None after the last).
Page = tuple[list[str], str | None]


async def _fill(path: Path) -> None:
    builder = WorkflowBuilder(definitions=[SERVICE_DEFS])
    async with SQLiteStore(path) as store:
        for _ in range(BUILT):
            await builder.start_workflow("ServiceQuick", store=store)
            await asyncio.sleep(0.003)  # creation times at least 3 ms apart (the --since test)


class Setup(NamedTuple):
    agent: AgentProcess
    online: Path  # the agent's config
    offline: Path  # the config of a database no agent drives
    mqtt: Mqtt


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("list-paging")
    broker = Broker(directory / "broker")
    broker.start()
    prefix = unique_prefix()
    online = write_config(
        directory / "online", device_id=DEVICE, mqtt={"port": broker.port, "topic_prefix": prefix}
    )
    offline = write_config(directory / "offline", device_id=DEVICE)
    made = directory / "offline" / "state" / "edgesaga.db"
    made.parent.mkdir(parents=True)
    asyncio.run(_fill(made))
    (directory / "online" / "state").mkdir(parents=True)
    shutil.copyfile(made, directory / "online" / "state" / "edgesaga.db")
    try:
        with agent_process(online) as agent:
            agent.wait_ready()
            mqtt = Mqtt(broker.port, prefix)
            try:
                ping = b'{"request_id": "ping"}'
                poll(lambda: mqtt.call("list", ping, within=0.5), bool, what="the MQTT link")
                yield Setup(agent, online, offline, mqtt)
            finally:
                mqtt.close()
    finally:
        broker.stop()


def _ids(reply: dict[str, Any]) -> Page:
    assert reply["ok"] is True, reply
    return [w["workflow_id"] for w in reply["workflows"]], reply["next_cursor"]


def _walk(ask: Callable[[str | None], Page], between: Callable[[], None]) -> list[list[str]]:
    """Every page from the first, calling ``between`` after each page that has a next one."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        ids, cursor = ask(cursor)
        pages.append(ids)
        if cursor is None:
            return pages
        between()
        assert len(pages) < 10, "the pages never end"


def _check(pages: list[list[str]], oracle: list[str], new: list[str]) -> None:
    assert len(oracle) >= BUILT
    assert [len(p) for p in pages] == [PAGE, PAGE, len(oracle) - 2 * PAGE]
    walked = [wid for page in pages for wid in page]
    assert walked == oracle  # in order: none twice, none missing
    assert new
    assert not set(new) & set(walked)


def _starter(agent: AgentProcess, new: list[str]) -> Callable[[], None]:
    def start_two() -> None:
        for _ in range(2):
            wid = agent.start("ServiceQuick", workflow_id=f"late-{uuid.uuid4().hex[:8]}")
            new.append(wid)

    return start_two


# ------------------------------------------------------------------------------------------------
# the three paths


def test_socket_pages_do_not_shift_when_workflows_start_between_them(setup: Setup) -> None:
    agent = setup.agent
    oracle, end = _ids(agent.request("list", limit=1000))
    assert end is None
    new: list[str] = []
    pages = _walk(
        lambda c: _ids(agent.request("list", limit=PAGE, **({"cursor": c} if c else {}))),
        _starter(agent, new),
    )
    _check(pages, oracle, new)
    # a walk begun now starts with the new ones, newest first
    first, _ = _ids(agent.request("list", limit=PAGE))
    assert first[: len(new)] == new[::-1]


def test_mqtt_pages_do_not_shift_when_workflows_start_between_them(setup: Setup) -> None:
    mqtt = setup.mqtt
    oracle, end = _ids(mqtt.command("list", {"limit": 1000}))
    assert end is None
    new: list[str] = []
    pages = _walk(
        lambda c: _ids(mqtt.command("list", {"limit": PAGE, **({"cursor": c} if c else {})})),
        _starter(setup.agent, new),
    )
    _check(pages, oracle, new)


def _edgesaga(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent._cli", *argv],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def _cli_pages(first: subprocess.CompletedProcess[str], between: Callable[[], None]) -> list[Any]:
    """The pages of ``edgesaga list --json``, each next one by the command line its stderr gives."""
    pages = []
    result = first
    while True:
        assert result.returncode == 0, result.stderr
        pages.append([w["workflow_id"] for w in json.loads(result.stdout)])
        more = [line for line in result.stderr.splitlines() if line.startswith("more: ")]
        if not more:
            assert result.stderr == ""
            return pages
        (line,) = more
        words = shlex.split(line.removeprefix("more: "))
        assert words[:2] == ["edgesaga", "list"], line
        assert "--cursor" in words, line
        between()
        result = _edgesaga(words[1:])
        assert len(pages) < 10, "the pages never end"


@pytest.mark.parametrize("through", ["agent", "no agent"])
def test_cli_pages_follow_the_next_page_command_it_prints(setup: Setup, through: str) -> None:
    config = setup.online if through == "agent" else setup.offline
    oracle = [
        w["workflow_id"]
        for w in json.loads(cli(config, "list", "--limit", "1000", "--json").stdout)
    ]
    new: list[str] = []
    between = _starter(setup.agent, new) if through == "agent" else lambda: None
    pages = _cli_pages(cli(config, "list", "--limit", str(PAGE), "--json"), between)
    if through == "agent":
        _check(pages, oracle, new)
    else:
        assert [len(p) for p in pages] == [PAGE, PAGE, BUILT - 2 * PAGE]
        assert [wid for page in pages for wid in page] == oracle


def test_cli_table_ends_with_the_next_page_on_stderr(setup: Setup) -> None:
    result = cli(setup.offline, "list", "--limit", "3", "--status", "COMPLETED")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + 3  # the header and three rows, nothing else
    (line,) = result.stderr.splitlines()
    words = shlex.split(line.removeprefix("more: "))
    assert words[:6] == [
        "edgesaga",
        "list",
        "--status",
        "COMPLETED",
        "--config",
        str(setup.offline),
    ]
    assert words[6:8] == ["--limit", "3"]
    assert words[8] == "--cursor"


# ------------------------------------------------------------------------------------------------
# a cursor no agent gave, the time window


def _error(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


@pytest.mark.parametrize("cursor", ["bogus", "not a cursor", "MTIzOg"])
def test_a_cursor_no_agent_gave_is_the_same_invalid_command_on_every_path(
    setup: Setup, cursor: str
) -> None:
    over_socket = _error(setup.agent.request("list", cursor=cursor))
    over_mqtt = _error(setup.mqtt.command("list", {"cursor": cursor}))
    result = cli(setup.offline, "list", "--cursor", cursor)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == f"edgesaga: error: {over_socket[1]} ({over_socket[0]})"
    assert over_socket == over_mqtt
    code, message = over_socket
    assert code == "invalid_command"
    assert "cursor" in message
    assert "Traceback" not in result.stderr


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_since_and_until_bound_the_creation_time(setup: Setup) -> None:
    rows = json.loads(cli(setup.offline, "list", "--limit", "1000", "--json").stdout)
    times = [_at(r["created_at"]) for r in rows]  # newest first, milliseconds
    # between rows 200 and 199, and between rows 51 and 50: at least 2 ms from each (3 ms apart)
    since, until = (times[200] + times[199]) / 2, (times[51] + times[50]) / 2
    assert times[199] - since > 0.001
    assert until - times[51] > 0.001

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat()

    window = ["--since", iso(since), "--until", iso(until), "--limit", "1000", "--json"]
    listed = cli(setup.offline, "list", *window)
    assert listed.returncode == 0, listed.stderr
    expected = [r["workflow_id"] for r in rows[51:200]]
    assert [r["workflow_id"] for r in json.loads(listed.stdout)] == expected
    over_mqtt = _ids(setup.mqtt.command("list", {"since": iso(since), "until": iso(until)}))
    assert over_mqtt == (expected[:50], over_mqtt[1])
    assert over_mqtt[1] is not None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"since": "2026-12-01T10:00:00"}, "since"),  # no zone
        ({"until": "yesterday"}, "until"),
        ({"since": "2026-12-01T10:00:00Z", "until": "2026-12-01T09:00:00Z"}, "since"),
    ],
)
def test_a_bad_time_is_refused_naming_it(setup: Setup, fields: dict[str, str], field: str) -> None:
    code, message = _error(setup.mqtt.command("list", fields))
    assert code == "invalid_command"
    assert field in message
    argv = [w for k, v in fields.items() for w in (f"--{k}", v)]
    result = cli(setup.offline, "list", *argv)
    assert result.returncode == 2
    assert result.stderr.strip() == f"edgesaga: error: {message} ({code})"
