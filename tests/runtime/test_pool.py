"""The runner pool with real runner processes (the counting test backend: no model files,
fast starts): batches go to free runners, a refusing pool fails at once and accepts again,
stop and shrink reach every runner. Nothing is mocked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from counting_backend import CountingBackend

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.batcher import Batcher
from lastmile.runtime.errors import ModelUnavailable
from lastmile.runtime.pool import RunnerPool
from lastmile.runtime.runner import PIPELINE_DEPTH, Runner


@pytest.fixture
def shm(shm_pool):
    return shm_pool


@pytest.fixture
async def pool(forkserver, shm, tmp_path: Path):
    manifest = Manifest(name="counting", path=tmp_path, format="onnx", artifact=tmp_path / "none")
    runners = [Runner(manifest, ModelSettings(), pool=shm, instance=i, backend_factory=CountingBackend) for i in range(2)]
    await asyncio.gather(*(r.start() for r in runners))
    p = RunnerPool("counting")
    for r in runners:
        p.add(r)
    yield p
    await p.stop()


async def test_batches_spread_over_the_runners_and_the_slots_come_back(pool):
    batcher = Batcher(pool.run, max_batch_size=4, max_delay_ms=1.0, max_queue=1000, timeout_s=30.0, concurrency=len(pool))
    try:
        xs = [np.full((1, 3), i, np.float32) for i in range(200)]
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        for (out, info), x in zip(results, xs):
            np.testing.assert_array_equal(out["double"], x * 2)
        assert all(r.batches > 0 for r in pool)
        assert pool._idle.qsize() == PIPELINE_DEPTH * len(pool)  # every slot is back
    finally:
        await batcher.close("test over")


async def test_a_refusing_pool_fails_at_once_and_accepts_again(pool):
    pool.refuse("model 'counting' is restarting: runner 1 died (SIGKILL)")
    with pytest.raises(ModelUnavailable, match="is restarting: runner 1 died"):
        await asyncio.wait_for(pool.run({"x": np.ones((1, 1), np.float32)}), 1)
    pool.accept()
    out = await pool.run({"x": np.ones((1, 1), np.float32)})
    assert out["double"][0, 0] == 2


async def test_shrink_and_stop_reach_every_runner(pool):
    await pool.shrink()
    assert all(r.alive for r in pool)
    runners = list(pool)
    await pool.stop()
    assert len(pool) == 0 and all(r.state == "stopped" for r in runners)
    await pool.shrink()  # nothing left: a no-op
