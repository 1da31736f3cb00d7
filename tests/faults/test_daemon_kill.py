"""kill -9 of the daemon during traffic and during a load: its runners follow it, shared memory
is reclaimed on the next start, the state file is whole, and the restart restores the models."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from lastmile.appliance.client.api import ClientError, LastmileClient
from lastmile.runtime.shm import count_segments
from tests.conftest import start_daemon

pytestmark = pytest.mark.faults


def _wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.1)
    return alive


async def test_kill_9_daemon_during_traffic_and_during_a_load(store_copy: Path, tmp_path: Path) -> None:
    home = tmp_path / "d"
    d = start_daemon(home, store_copy)
    async with LastmileClient(d.socket) as client:
        await client.load("demo-mlp")
        await client.load("demo-lm")
        children = {p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)}
        x = np.ones((1, 64), np.float32)

        async def traffic() -> None:
            while True:
                try:
                    await client.infer("demo-mlp", {"input": x}, {"input": "FP32"})
                except ClientError:
                    return

        workers = [asyncio.create_task(traffic()) for _ in range(4)]
        await asyncio.sleep(0.5)
        killed = [d.proc.pid]
        assert count_segments(f"lastmile-{d.proc.pid}-") > 0, "traffic uses pool segments"
        d.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*workers), 10)  # clients see errors, never hang
    d.proc.wait(10)
    assert not _wait_gone(children), "runners and the forkserver die with the daemon"
    state = json.loads((home / "state.json").read_text())
    assert set(state["models"]) == {"demo-mlp", "demo-lm"}

    d = start_daemon(home, store_copy)
    async with LastmileClient(d.socket) as client:
        status = await client.status()
        assert status["models"] == {"demo-mlp": "ready", "demo-lm": "ready"}
        out, _ = await client.infer("demo-mlp", {"input": np.ones((1, 64), np.float32)}, {"input": "FP32"})
        assert out["logits"].shape == (1, 10)
        # now kill it in the middle of a load
        load = asyncio.create_task(client.load("demo-lm-ds"))
        for _ in range(100):
            model = (await client.models())["loaded"]
            if any(m["name"] == "demo-lm-ds" for m in model):
                break
            await asyncio.sleep(0.02)
        killed.append(d.proc.pid)
        d.proc.send_signal(signal.SIGKILL)
        with pytest.raises(ClientError):
            await load
    d.proc.wait(10)
    state = json.loads((home / "state.json").read_text())  # whole JSON, never half-written
    assert {"demo-mlp", "demo-lm"} <= set(state["models"])
    assert not list(home.glob(".state-*")), "no temp state file left"

    d = start_daemon(home, store_copy)
    try:
        async with LastmileClient(d.socket) as client:
            status = await client.status()
            assert {"demo-mlp", "demo-lm"} <= set(status["models"])
            assert all(v == "ready" for v in status["models"].values())
        for pid in killed:
            assert count_segments(f"lastmile-{pid}-") == 0, "the killed daemons' segments are reclaimed"
    finally:
        d.stop()
