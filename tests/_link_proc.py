"""Runs the in-process agent harness (store, runner, control, MQTT link) in its own process, for
the last-will test: ``python tests/_link_proc.py DB SETTINGS_JSON DEVICE``. Prints ``connected``
once the link is connected, then runs until killed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent._mqtt import MqttSettings
from tests._broker import running_agent


async def main(db: str, settings_json: str, device: str) -> None:
    settings = MqttSettings.model_validate_json(settings_json)
    async with running_agent(Path(db), settings, device=device) as agent:
        await agent.link.connected_event.wait()
        print("connected", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
