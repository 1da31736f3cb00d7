"""SIGHUP reloads the config; an invalid config is reported and the running one kept."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from lastmile.appliance.client.api import LastmileClient
from tests.conftest import start_daemon

pytestmark = pytest.mark.faults


async def _events(client: LastmileClient, kind: str) -> list[dict]:
    for _ in range(50):
        found = [e for e in await client.events() if e["kind"] == kind]
        if found:
            return found
        await asyncio.sleep(0.1)
    return []


async def test_sighup_reload_and_invalid_config_kept(demo_store: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", demo_store, extra_config="[defaults]\nmax_queue = 40\n")
    try:
        async with LastmileClient(d.socket) as client:
            original = d.config.read_text()
            d.config.write_text(original.replace("max_queue = 40", "max_queue = 120").replace("shutdown_grace_s = 5", "shutdown_grace_s = 6"))
            d.proc.send_signal(signal.SIGHUP)
            reloaded = await _events(client, "config_reloaded")
            assert reloaded and "server.shutdown_grace_s" in reloaded[0]["message"]
            model = await client.load("demo-mlp")
            assert model["settings"]["max_queue"] == 120, "new defaults apply to later loads"

            d.config.write_text(original.replace("max_queue = 40", "max_queue = 'many'"))
            d.proc.send_signal(signal.SIGHUP)
            rejected = await _events(client, "config_rejected")
            assert rejected and "defaults.max_queue" in rejected[0]["message"] and str(d.config) in rejected[0]["message"]
            assert (await client.status())["ready"]
            await client.unload("demo-mlp")
            assert (await client.load("demo-mlp"))["settings"]["max_queue"] == 120, "the running config stays"
        assert d.proc.poll() is None
    finally:
        d.stop()
