"""ModelManager.generate over a real runner process, and a daemon restart that restores a
loaded generation model from its state file."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from lastmile.appliance.client.api import LastmileClient
from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.errors import ModelUnavailable, RunnerDied
from lastmile.runtime.events import EventLog
from lastmile.runtime.generation.types import (GenerationRequest, InvalidGenerationTarget, SamplingParams)
from lastmile.runtime.manager import ModelManager, ModelNotLoaded
from tests.conftest import start_daemon


@pytest.fixture
def store(tiny_lm: Path, demo_store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(demo_store, root)
    shutil.copytree(tiny_lm, root / "tiny")
    return root


async def test_generate_through_the_manager(forkserver, store: Path):
    manager = ModelManager(ModelStore(store), ModelSettings(), EventLog())
    try:
        model = await manager.load("tiny", {"engine": "deepspeed", "max_batch_size": 4})
        assert model.generation and model.batcher is None
        chunks = [c async for c in manager.generate("tiny", GenerationRequest(
            SamplingParams(max_tokens=8, temperature=0.0),
            messages=({"role": "user", "content": "What is the capital of France?"},)))]
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 8
        assert sum(len(c.token_ids) for c in chunks) == 8
        await asyncio.sleep(0.3)  # the runner's stats message follows the last chunk
        gen = model.describe()["generation"]
        assert gen["engine"] == "deepspeed" and gen["running"] == 0
        assert gen["generated_tokens_total"] >= 8 and gen["ttft_s"]["count"] >= 1
        assert gen["kv_reserved_bytes"] == gen["max_num_seqs"] * gen["max_context"] * gen["kv_bytes_per_token"]

        for name, exc in (("nope", ModelNotLoaded), ("tiny-missing", ModelNotLoaded)):
            with pytest.raises(exc):
                await manager.generate(name, GenerationRequest(SamplingParams(), prompt="x")).__anext__()
        tensor_model = next(n for n in ModelStore(store).names() if n != "tiny")
        await manager.load(tensor_model)
        with pytest.raises(InvalidGenerationTarget):
            await manager.generate(tensor_model, GenerationRequest(SamplingParams(), prompt="x")).__anext__()

        # kill -9 mid-stream: the stream ends with RunnerDied, then the model restarts
        stream = manager.generate("tiny", GenerationRequest(SamplingParams(max_tokens=1500, temperature=0.0), prompt="Hi"))
        await stream.__anext__()
        os.kill(model.runners[0].pid, signal.SIGKILL)
        with pytest.raises(RunnerDied):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
        with pytest.raises((ModelUnavailable, RunnerDied)):
            await manager.generate("tiny", GenerationRequest(SamplingParams(), prompt="x")).__anext__()
        async with asyncio.timeout(120):
            while model.state != "ready":
                await asyncio.sleep(0.1)
        chunks = [c async for c in manager.generate("tiny", GenerationRequest(SamplingParams(max_tokens=3), prompt="Hi"))]
        assert chunks[-1].completion_tokens == 3

        # keep_alive_s (live): unloaded once idle that long, never while a stream runs
        stream = manager.generate("tiny", GenerationRequest(SamplingParams(max_tokens=1900, temperature=0.0), prompt="Hi"))
        await stream.__anext__()
        manager.configure("tiny", {"keep_alive_s": 1.0})
        await asyncio.sleep(2.5)
        assert "tiny" in manager.models, "unloaded while a stream was running"
        await stream.aclose()
        async with asyncio.timeout(10):
            while "tiny" in manager.models:
                await asyncio.sleep(0.1)
    finally:
        await manager.close()


@pytest.mark.slow  # two daemon starts (forkserver boots): ~70 s on the shared 2-core box
async def test_daemon_restart_restores_the_generation_model(store: Path, tmp_path: Path):
    home = tmp_path / "d"
    d = start_daemon(home, store)
    try:
        async with LastmileClient(d.socket) as client:
            await client.load("tiny", {"engine": "deepspeed", "max_batch_size": 4})
            assert (await client.model("tiny"))["generation"]["engine"] == "deepspeed"
        assert d.stop() == 0
        d = start_daemon(home, store)
        async with LastmileClient(d.socket) as client:
            async with asyncio.timeout(120):
                while (model := await client.model("tiny"))["state"] != "ready":
                    await asyncio.sleep(0.2)
            gen = model["generation"]
            assert gen["engine"] == "deepspeed" and gen["running"] == 0 and gen["max_context"] == 2048
    finally:
        d.stop()
