"""Changing graph fusion (or any setting that needs new runners) reloads a serving model
without dropping requests: new runners start beside the old, requests switch, the old drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from lastmile.appliance.client.api import LastmileClient
from tests.conftest import start_daemon


async def test_fusion_change_switches_without_dropping_requests(demo_store: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", demo_store)
    try:
        async with LastmileClient(d.socket) as client:
            before = await client.load("demo-mlp", {"graph_fusion": "basic"})
            old_pid = before["runners"][0]["pid"]
            x = np.ones((1, 64), np.float32)
            expected, _ = await client.infer("demo-mlp", {"input": x}, {"input": "FP32"})
            stop, failures, served = asyncio.Event(), [], []

            async def traffic() -> None:
                while not stop.is_set():
                    try:
                        out, _ = await client.infer("demo-mlp", {"input": x}, {"input": "FP32"})
                        np.testing.assert_allclose(out["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
                        served.append(1)
                    except Exception as exc:  # noqa: BLE001 - every failure is the finding
                        failures.append(exc)

            workers = [asyncio.create_task(traffic()) for _ in range(4)]
            await asyncio.sleep(0.3)
            after = await client.tune("demo-mlp", {"graph_fusion": "all"})
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)

            assert failures == [], failures[:3]
            assert len(served) > 20
            assert after["settings"]["graph_fusion"] == "all" and after["runners"][0]["pid"] != old_pid
            assert after["backend_info"]["graph_optimization_level"].endswith("ALL")
            kinds = [e["kind"] for e in await client.events()]
            assert "switched" in kinds and "reload_in_place" not in kinds
    finally:
        d.stop()
