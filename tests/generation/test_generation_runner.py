"""Generation in a real runner process (forked from the preloaded forkserver), over the pipes.

Nothing is mocked: the child loads the tiny causal LM with the torch/DeepSpeed engine; the
daemon side is the GenerationRunner the manager uses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from lastmile.models.manifest import load_manifest
from lastmile.models.settings import ModelSettings
from lastmile.runtime.errors import RunnerDied
from lastmile.runtime.generation.runner import GenerationRunner
from lastmile.runtime.generation.types import ContextOverflow, GenerationRequest, SamplingParams
from lastmile.runtime.shm import BufferPool


@pytest.fixture
def pool(shm_pool):
    return shm_pool


async def start(folder: Path, pool: BufferPool, **settings) -> GenerationRunner:
    manifest = load_manifest(folder, "tiny")
    runner = GenerationRunner(manifest, ModelSettings().overlay({"engine": "deepspeed", **settings}), pool=pool)
    await runner.start(timeout_s=120)
    return runner


async def collect(stream) -> tuple[list[int], str, object]:
    ids: list[int] = []
    text = ""
    last = None
    async for c in stream:
        ids += c.token_ids
        text += c.text
        last = c
    return ids, text, last


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


async def test_streams_equal_in_process_and_refusals_come_first(forkserver, tiny_lm, pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    runner = await start(tiny_lm, pool)
    try:
        assert runner.info["engine"] == "deepspeed" and runner.info["generation"]
        tok = AutoTokenizer.from_pretrained(tiny_lm)
        hf = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
        prompts = ["Hello" * i + " world" for i in range(1, 9)]
        results = await asyncio.gather(*(collect(runner.generate(GenerationRequest(greedy(20), prompt=p)))
                                         for p in prompts))
        for p, (ids, text, last) in zip(prompts, results):
            x = torch.tensor([tok(p)["input_ids"]])
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)[0, x.shape[1]:]
            assert ids == ref.tolist()
            assert last.finish_reason == "length" and last.completion_tokens == 20
            assert last.prompt_tokens == x.shape[1]
        stream = runner.generate(GenerationRequest(greedy(5000), prompt="Hello"))
        with pytest.raises(ContextOverflow) as e:
            await stream.__anext__()
        assert e.value.field == "max_tokens" and e.value.max_context == 2048
    finally:
        await runner.stop()


async def test_aclose_frees_slot_and_kv_at_once(forkserver, tiny_lm, pool):
    runner = await start(tiny_lm, pool, max_batch_size=8)
    try:
        streams = [runner.generate(GenerationRequest(greedy(1500), prompt="Hello world " * 50)) for _ in range(4)]
        for s in streams:
            await s.__anext__()
        mem = await runner.memory()
        gen = mem["backend"]["generation"]
        assert gen["running"] == 4 and gen["kv_used_bytes"] > 0
        for s in streams:
            await s.aclose()
        t0 = time.monotonic()
        while True:
            gen = (await runner.memory())["backend"]["generation"]
            if gen["running"] == 0:
                break
            assert time.monotonic() - t0 < 2.0, gen
            await asyncio.sleep(0.01)
        assert gen["kv_used_bytes"] == 0 and gen["waiting"] == 0
    finally:
        await runner.stop()


async def test_kill_9_mid_stream_raises_runner_died_never_hangs(forkserver, tiny_lm, pool):
    runner = await start(tiny_lm, pool)
    stream = runner.generate(GenerationRequest(greedy(1900), prompt="Hello"))
    await stream.__anext__()
    os.kill(runner.pid, signal.SIGKILL)
    with pytest.raises(RunnerDied):
        async with asyncio.timeout(10):
            while True:
                await stream.__anext__()
    await runner.stop()


@pytest.mark.slow  # ~2 min on the shared 2-core box (11,200 prompt tokens to prefill)
async def test_aclose_gives_the_kv_memory_back_measured(forkserver, tmp_path, pool):
    """RSS of the runner process, not just the engine's own count: 8 sequences of 1,400 prompt
    tokens hold ~88 MiB of KV (8 KiB/token in this wider tiny model); after aclose() it is gone."""
    import psutil

    from lastmile.runtime.generation.tiny import build_tiny_lm

    folder = build_tiny_lm(tmp_path / "wide", hidden_size=256, layers=4, heads=8, kv_heads=8)
    runner = await start(folder, pool)
    try:
        proc = psutil.Process(runner.pid)
        await asyncio.sleep(0.5)  # idle after warm-up: the child trimmed its heap
        before = proc.memory_info().rss
        per_token = 2 * 4 * 8 * 32 * 4
        prompt = tuple((i * 31) % 500 + 5 for i in range(1400))
        streams = [runner.generate(GenerationRequest(greedy(400), prompt_token_ids=prompt)) for _ in range(8)]
        for s in streams:
            await s.__anext__()
        during = proc.memory_info().rss
        kv = 8 * 1400 * per_token
        assert during - before > 0.7 * kv, (before, during, kv)
        for s in streams:
            await s.aclose()
        async with asyncio.timeout(10):
            while (await runner.memory())["backend"]["generation"]["running"]:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the idle child's malloc_trim
        after = proc.memory_info().rss
        assert after - before < 0.25 * (during - before), (before, during, after)
    finally:
        await runner.stop()
