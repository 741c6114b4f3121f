"""The sd_notify protocol (``man 3 sd_notify``) in plain Python, plus a health-gated watchdog loop.

systemd hands a ``Type=notify`` service the address of a datagram socket in ``NOTIFY_SOCKET``; the
service sends newline-separated ``KEY=value`` assignments to it (``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``). Outside systemd the variable is unset and every call is a no-op, so
the agent runs the same on a laptop.

Like libsystemd's ``sd_notify()``, each message opens a fresh non-blocking ``AF_UNIX``/``SOCK_DGRAM``
socket and closes it again: messages are rare (one watchdog ping every few seconds), and nothing is
left open to leak or to inherit across a fork.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["Notifier", "watchdog_loop"]

logger = logging.getLogger("edgesaga.sdnotify")


class Notifier:
    """Send service state to systemd over ``NOTIFY_SOCKET``; does nothing when there is none.

    ``socket_path`` overrides the environment: a file-system path (``/run/systemd/notify``) or an
    abstract-namespace name written with a leading ``@``. ``environ`` (default :data:`os.environ`)
    is where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read; tests pass a dict.

    Raises :class:`ValueError` when ``socket_path`` is given but is not an address this class can
    use. An unusable ``NOTIFY_SOCKET`` from the environment (such as systemd's ``vsock:`` form for
    virtual machines) is logged as a warning and leaves the notifier disabled instead: a service
    must not fail to start over it.
    """

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._address: str | None = None
        self._display: str | None = None
        if socket_path is not None:
            self._address = _parse_address(socket_path)
            if self._address is None:
                raise ValueError(
                    f"The notify socket {socket_path!r} is neither an absolute path nor an "
                    "abstract-namespace name starting with '@'; pass one of those, or None to "
                    "read NOTIFY_SOCKET from the environment."
                )
            self._display = socket_path
        else:
            value = self._environ.get("NOTIFY_SOCKET") or None
            self._display = value
            if value is not None:
                self._address = _parse_address(value)
                if self._address is None:
                    logger.warning(
                        "NOTIFY_SOCKET=%r is not a path or an abstract socket name; "
                        "systemd notifications are disabled.",
                        value,
                    )
                    self._display = None

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        """The socket as configured (``@name`` for abstract sockets), or None when disabled."""
        return self._display

    def __repr__(self) -> str:
        return f"{type(self).__name__}(socket_path={self._display!r})"

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the free-form status line ``systemctl status`` shows (``STATUS=...``)."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the service watchdog (``WATCHDOG=1``)."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a graceful stop has begun (``STOPPING=1``), optionally with a status."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def send(self, **fields: str | int | bool) -> bool:
        """Send one datagram of ``KEY=value`` lines; return whether it was handed to the socket.

        Returns False, without raising, when the notifier is disabled or the send fails (the
        failure is logged at debug level: systemd may simply not be listening any more). ``True``
        and ``False`` values are sent as ``1`` and ``0``; newlines inside a value would start a new
        assignment, so they are replaced by spaces. Raises :class:`ValueError` for no fields or for
        a key that is not a non-empty name without ``=`` or whitespace; that is a programming error.
        """
        if not fields:
            raise ValueError("send() needs at least one KEY=value field, e.g. send(READY=1).")
        lines = []
        for key, value in fields.items():
            if not key or "=" in key or any(ch.isspace() for ch in key):
                raise ValueError(
                    f"{key!r} is not a valid sd_notify field name; use a name such as READY or "
                    "STATUS, without '=' or whitespace."
                )
            text = str(int(value)) if isinstance(value, bool) else str(value)
            lines.append(f"{key}={text.replace(chr(10), ' ')}")
        if self._address is None:
            return False
        payload = ("\n".join(lines) + "\n").encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            logger.debug("sd_notify to %s failed: %s", self._display, exc)
            return False
        return True

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, or None when not asked for.

        None when ``WATCHDOG_USEC`` is unset, not a positive integer, or when ``WATCHDOG_PID`` is
        set to a process other than this one (the variables were inherited, not meant for us),
        the same rules as libsystemd's ``sd_watchdog_enabled()``.
        """
        usec_text = self._environ.get("WATCHDOG_USEC")
        if not usec_text:
            return None
        try:
            usec = int(usec_text)
        except ValueError:
            logger.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled.", usec_text)
            return None
        if usec <= 0:
            return None
        pid_text = self._environ.get("WATCHDOG_PID")
        if pid_text:
            try:
                pid = int(pid_text)
            except ValueError:
                logger.warning("WATCHDOG_PID=%r is not an integer; watchdog disabled.", pid_text)
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000


def _parse_address(value: str) -> str | None:
    """Turn a NOTIFY_SOCKET value into a ``sendto`` address, or None when it is unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


async def watchdog_loop(
    notifier: Notifier,
    health_check: Callable[[], Awaitable[bool]],
    interval: float,
) -> None:
    """Ping the watchdog every ``interval`` seconds, but only while ``health_check()`` says so.

    Each round awaits ``health_check()`` with a timeout of ``interval``. ``WATCHDOG=1`` is sent only
    when it returned ``True`` (the object, not merely a truthy value) in time; a check that hangs,
    returns anything else or raises withholds the ping, and after ``WatchdogSec`` without one
    systemd kills and restarts the service. A blocked event loop never gets here at all, which is
    the point. Rounds start ``interval`` apart (a slow check eats into the wait, it does not add to
    it). Runs until cancelled; cancellation always propagates.
    """
    if not interval > 0:
        raise ValueError(
            f"The watchdog interval must be a positive number of seconds, not {interval!r}."
        )
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        healthy = False
        try:
            async with asyncio.timeout(interval) as deadline:
                result = await health_check()
            if deadline.expired():
                # The check swallowed the timeout's cancellation and returned: still too late.
                raise TimeoutError
            healthy = result is True
            if not healthy:
                logger.warning(
                    "Health check returned %r, not True; withholding the watchdog ping.", result
                )
        except TimeoutError:
            logger.warning(
                "Health check did not answer within %.1f s; withholding the watchdog ping.",
                interval,
            )
        except Exception:
            logger.exception("Health check raised; withholding the watchdog ping.")
        if healthy:
            notifier.watchdog()
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
