"""sd_notify against real AF_UNIX datagram sockets owned by the test, and the health-gated watchdog."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from agent._sdnotify import Notifier, watchdog_loop


def _drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket in a short directory (sun_path is limited to 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.setblocking(False)
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(directory)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket in the abstract namespace, named ``@edgesaga-test-<uuid>``."""
    name = f"edgesaga-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield "@" + name, sock
    finally:
        sock.close()


def test_ready_status_stopping_reach_a_path_socket(
    path_socket: tuple[str, socket.socket],
) -> None:
    path, sock = path_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.address == path

    assert notifier.ready() is True
    assert notifier.status("recovering 3 workflows") is True
    assert notifier.watchdog() is True
    assert notifier.stopping() is True

    assert _drain(sock) == [
        "READY=1\n",
        "STATUS=recovering 3 workflows\n",
        "WATCHDOG=1\n",
        "STOPPING=1\n",
    ]


def test_send_packs_several_fields_in_one_datagram(path_socket: tuple[str, socket.socket]) -> None:
    path, sock = path_socket
    notifier = Notifier(socket_path=path)

    assert notifier.ready("running, 0 workflows") is True
    assert notifier.stopping("stopping: 2 steps finishing") is True
    assert notifier.send(STATUS="two\nlines", MAINPID=1234, READY=True) is True

    assert _drain(sock) == [
        "READY=1\nSTATUS=running, 0 workflows\n",
        "STOPPING=1\nSTATUS=stopping: 2 steps finishing\n",
        # A newline in a value would inject a second assignment; it becomes a space.
        "STATUS=two lines\nMAINPID=1234\nREADY=1\n",
    ]


def test_abstract_namespace_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    name, sock = abstract_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": name})

    assert notifier.address == name
    assert notifier.ready() is True
    assert _drain(sock) == ["READY=1\n"]


def test_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch, abstract_socket: tuple[str, socket.socket]
) -> None:
    name, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)

    assert Notifier().status("hello") is True
    assert _drain(sock) == ["STATUS=hello\n"]


def test_explicit_socket_path_overrides_the_environment(
    abstract_socket: tuple[str, socket.socket], path_socket: tuple[str, socket.socket]
) -> None:
    name, abstract = abstract_socket
    path, by_path = path_socket
    notifier = Notifier(socket_path=path, environ={"NOTIFY_SOCKET": name})

    assert notifier.ready() is True
    assert _drain(by_path) == ["READY=1\n"]
    assert _drain(abstract) == []


def test_no_op_when_notify_socket_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for notifier in (Notifier(), Notifier(environ={}), Notifier(environ={"NOTIFY_SOCKET": ""})):
        assert not notifier.enabled
        assert notifier.address is None
        assert notifier.ready() is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False


def test_send_failure_returns_false_and_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    # Nobody is bound to this name: sendto fails with ECONNREFUSED.
    notifier = Notifier(socket_path=f"@edgesaga-nobody-{uuid.uuid4().hex}")
    with caplog.at_level("DEBUG", logger="edgesaga.sdnotify"):
        assert notifier.ready() is False
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "sd_notify" in caplog.records[0].getMessage()


def test_send_to_a_full_socket_does_not_block(abstract_socket: tuple[str, socket.socket]) -> None:
    name, _sock = abstract_socket  # never read, so its queue fills up
    notifier = Notifier(socket_path=name)
    results = [notifier.status("x" * 4096) for _ in range(2000)]
    assert results[0] is True
    assert False in results  # EAGAIN reported as False instead of blocking or raising


def test_invalid_explicit_socket_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="absolute path"):
        Notifier(socket_path="relative/notify")
    with pytest.raises(ValueError, match="absolute path"):
        Notifier(socket_path="@")


def test_unusable_environment_socket_disables_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="edgesaga.sdnotify"):
        notifier = Notifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        Notifier("/run/systemd/notify")  # type: ignore[call-arg]


@pytest.mark.parametrize("fields", [{}, {"BAD KEY": 1}, {"A=B": 1}])
def test_send_rejects_malformed_fields(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"send\(\)|field name"):
        Notifier(environ={}).send(**fields)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert Notifier(environ=environ).watchdog_interval() == expected


# --- watchdog_loop ---------------------------------------------------------------------------

INTERVAL = 0.05


async def _run_for(seconds: float, *coros: Coroutine[Any, Any, None]) -> None:
    """Run ``watchdog_loop`` coroutines for ``seconds`` and cancel them, checking they cancel."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


async def test_watchdog_loop_pings_at_the_interval_while_healthy(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    name, sock = abstract_socket
    checks = 0

    async def healthy() -> bool:
        nonlocal checks
        checks += 1
        return True

    await _run_for(
        INTERVAL * 10 + INTERVAL / 2, watchdog_loop(Notifier(socket_path=name), healthy, INTERVAL)
    )

    pings = _drain(sock)
    assert set(pings) == {"WATCHDOG=1\n"}
    # One round at t=0 then one per interval: 11 in 10.5 intervals. Allow for a slow CI machine,
    # but not for a loop that spins (far more) or one that waits twice the interval (about 6).
    assert 8 <= len(pings) <= 12
    assert checks == len(pings)


async def test_watchdog_loop_stops_pinging_when_the_check_hangs(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    name, sock = abstract_socket
    wedged = asyncio.Event()
    cancelled_checks = 0

    async def check() -> bool:
        nonlocal cancelled_checks
        if wedged.is_set():
            try:
                await asyncio.Event().wait()  # a stuck database query
            except asyncio.CancelledError:
                cancelled_checks += 1
                raise
        return True

    task = asyncio.ensure_future(watchdog_loop(Notifier(socket_path=name), check, INTERVAL))
    await asyncio.sleep(INTERVAL * 3.5)
    healthy_pings = len(_drain(sock))
    wedged.set()
    await asyncio.sleep(INTERVAL * 0.6)  # let a round that already passed its check finish
    _drain(sock)
    await asyncio.sleep(INTERVAL * 6)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert healthy_pings >= 2
    assert _drain(sock) == []
    # Each hung check was cut off by the per-check timeout and the loop kept trying.
    assert cancelled_checks >= 3


@pytest.mark.parametrize("outcome", [False, None, 1, "yes", RuntimeError("db is locked")])
async def test_watchdog_loop_withholds_pings_unless_the_check_returns_true(
    abstract_socket: tuple[str, socket.socket], outcome: object
) -> None:
    name, sock = abstract_socket
    checks = 0

    async def check() -> bool:
        nonlocal checks
        checks += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome  # type: ignore[return-value]

    await _run_for(INTERVAL * 4.5, watchdog_loop(Notifier(socket_path=name), check, INTERVAL))

    assert _drain(sock) == []
    assert checks >= 3  # the loop went on checking; it did not die on the first failure


async def test_watchdog_loop_treats_a_check_that_swallows_its_timeout_as_failed(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    name, sock = abstract_socket
    misbehave = True
    swallowed = 0

    async def stubborn() -> bool:
        nonlocal swallowed
        try:
            await asyncio.sleep(INTERVAL * 3)
        except asyncio.CancelledError:
            if not misbehave:
                raise
            swallowed += 1  # ignores the timeout's cancellation and claims success
        return True

    task = asyncio.ensure_future(watchdog_loop(Notifier(socket_path=name), stubborn, INTERVAL))
    await asyncio.sleep(INTERVAL * 4.5)
    misbehave = False  # so that the test's own cancellation below is not swallowed too
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert swallowed >= 2
    assert _drain(sock) == []


async def test_watchdog_loop_propagates_cancellation_during_a_check(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    name, sock = abstract_socket
    entered = asyncio.Event()

    async def slow() -> bool:
        entered.set()
        await asyncio.sleep(10)
        return True

    task = asyncio.ensure_future(watchdog_loop(Notifier(socket_path=name), slow, 5.0))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert _drain(sock) == []


@pytest.mark.parametrize("interval", [0, -1.0])
async def test_watchdog_loop_rejects_a_non_positive_interval(interval: float) -> None:
    async def check() -> bool:
        return True

    with pytest.raises(ValueError, match="positive"):
        await watchdog_loop(Notifier(environ={}), check, interval)
