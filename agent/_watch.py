"""``edgesaga watch``: one line per event and alert a device publishes over MQTT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from typing import Any, TextIO

import paho.mqtt.client as paho

from agent._config import MqttSettings
from agent._mqtt import Topics, _topic_safe
from agent._transport import (
    ClientOptions,
    ConnectFailed,
    Connection,
    Lost,
    backoff,
    open_connection,
)

log = logging.getLogger("edgesaga.mqtt")


def _device_of(topic: str, prefix: str) -> str:
    rest = topic[len(prefix) + 1 :] if topic.startswith(prefix + "/") else topic
    return rest.split("/", 1)[0]


def format_event(topic: str, payload: bytes, prefix: str) -> str:
    """One line for ``edgesaga watch``:
    ``<at> <device> <workflow_id[:8]> <event> <step> attempt=<n> <status> <error>``; alerts read
    ``<at> <device> <workflow_id[:8]> ALERT <alert> <step> <message>``."""
    device = _device_of(topic, prefix)
    try:
        p = json.loads(payload)
        if not isinstance(p, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        return f"- {device} - (unreadable message on {topic})"
    wid = str(p.get("workflow_id") or "-")[:8]
    step = p.get("step") or "-"
    if topic.endswith("/alerts"):
        return f"{p.get('at')} {device} {wid} ALERT {p.get('alert')} {step} {p.get('message') or ''}".rstrip()
    attempt = p.get("attempt")
    return (
        f"{p.get('at')} {device} {wid} {p.get('event')} {step} "
        f"attempt={attempt if attempt is not None else '-'} {p.get('status')} {p.get('error') or ''}"
    ).rstrip()


async def watch(settings: MqttSettings, device: str = "+", out: TextIO = sys.stdout) -> None:
    """Print one line per event and alert of ``device`` (``+``: every device) until cancelled."""
    if device != "+" and not _topic_safe(device):
        raise ValueError(f"{device!r} is not a device id (or '+' for every device).")
    topics = Topics(settings.topic_prefix, device)
    client_id = f"edgesaga-watch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lines: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def on_message(_conn: Connection, message: paho.MQTTMessage) -> None:
        lines.put_nowait((message.topic, bytes(message.payload)))

    failures = 0
    while True:
        try:
            conn, _ = await open_connection(
                settings,
                client_id,
                ClientOptions(persistent=False, will_topic=None, manual_ack=False, inflight=20),
                receive_maximum=100,
                on_message=on_message,
                on_lost=lambda _c: None,
                on_puback=lambda: None,
            )
        except ConnectFailed as err:
            failures += 1
            delay = backoff(settings, failures)
            log.warning("%s; retrying in %.1f s", err.message, delay)
            await asyncio.sleep(delay)
            continue
        failures = 0
        try:
            await conn.subscribe([(topics.events, 1), (topics.alerts, 1)], v5_options=None)
            closed = conn.closed
            while not closed.done():
                getter = asyncio.ensure_future(lines.get())
                waiters: set[asyncio.Future[Any]] = {getter, closed}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if getter.done() and not getter.cancelled():
                    topic, payload = getter.result()
                    out.write(format_event(topic, payload, settings.topic_prefix) + "\n")
                while not lines.empty():
                    topic, payload = lines.get_nowait()
                    out.write(format_event(topic, payload, settings.topic_prefix) + "\n")
                out.flush()
            log.warning(
                "lost the connection to the MQTT broker (%s); reconnecting", closed.result()
            )
        except Lost:
            pass
        finally:
            await conn.close(clean=True)
        await asyncio.sleep(backoff(settings, 1))
