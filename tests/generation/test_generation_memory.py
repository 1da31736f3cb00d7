"""KV-cache arithmetic and admission for generation models: a load that does not fit is
refused (507) before any process starts, with the options that would fit and what they free."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.memory.units import MiB as MB
from lastmile.runtime.events import EventLog
from lastmile.runtime.generation.engine import ModelShape
from lastmile.runtime.manager import ModelManager
from lastmile.runtime.memory import InsufficientMemory


def test_kv_bytes_per_token_smollm2_shape():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; fp32 KV = 46,080 B/token, so 8k tokens
    # = 360 MiB (measured RSS growth here: +369 MiB)
    shape = ModelShape.from_config({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                    "hidden_size": 576, "max_position_embeddings": 8192})
    assert shape.kv_bytes_per_token(4) == 46_080
    assert shape.kv_bytes_per_token(4) * 8192 == 360 * MB


@pytest.fixture
def manager(tiny_lm: Path, tmp_path: Path) -> ModelManager:
    shutil.copytree(tiny_lm, tmp_path / "store" / "tiny")
    return ModelManager(ModelStore(tmp_path / "store"), ModelSettings(), EventLog())


async def test_load_that_does_not_fit_is_refused_with_options(manager: ModelManager):
    ask = {"engine": "deepspeed", "max_num_seqs": 64, "max_context": 4096, "memory_limit_mb": 200}
    dry = manager.estimate("tiny", ask)
    kv = 64 * 4096 * 512  # tiny LM: 2 x 2 layers x 2 KV heads x 16 x 4 B = 512 B/token
    assert dry["estimate"]["parts"]["workspace_bytes"] == kv
    assert not dry["fits"]
    with pytest.raises(InsufficientMemory) as e:
        await manager.load("tiny", ask)
    assert "tiny" not in manager.models
    options = {o["option"]: o for o in e.value.detail["options"]}
    ctx = options["generation_max_context"]
    assert ctx["settings"] == {"max_context": 1024}
    assert ctx["description"] == f"max_context 4096 -> 1024 frees {(kv - kv // 4) / MB:.0f} MiB"
    assert options["generation_max_num_seqs"]["settings"] == {"max_num_seqs": 16}
    assert "max_context 4096 -> 1024" in str(e.value)
    # each option really fits
    for o in options.values():
        assert manager.estimate("tiny", {**ask, **o["settings"]})["fits"], o


async def test_the_ladder_gives_a_generation_model_fewer_slots_then_sheds_and_recovers(tiny_lm: Path, tmp_path: Path):
    """A generation model over its high watermark: shrink, then max_num_seqs halves step by
    step (8 -> 4 -> 2 -> 1; the newest running sequences are preempted, their KV freed, and
    recomputed later), then new requests are shed with 503. Every stream already running ends
    normally (a pause, never an error). Back under the watermark: requests are taken again and
    the slots come back."""
    import asyncio
    import time

    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams
    from lastmile.runtime.memory import MemoryPressure

    shutil.copytree(tiny_lm, tmp_path / "store" / "tiny")
    events = EventLog()
    manager = ModelManager(ModelStore(tmp_path / "store"), ModelSettings(), events, memory={"sample_interval_s": 0.1})

    async def drain(stream) -> list:
        return [c async for c in stream]

    def steps() -> list[str]:
        return [e["data"]["step"] for e in events.since(0) if e["kind"] in ("memory_mitigation", "memory_recovered")]

    async def until(step: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while step not in steps():
            assert time.monotonic() < deadline, steps()
            await asyncio.sleep(0.05)

    try:
        await manager.load("tiny", {"engine": "deepspeed", "max_num_seqs": 8, "max_context": 2048, "memory_limit_mb": 4000})
        request = GenerationRequest(SamplingParams(max_tokens=1000, temperature=0.0), prompt="Count with me: one two three")
        tasks = [asyncio.create_task(drain(manager.generate("tiny", request))) for _ in range(6)]
        await asyncio.sleep(0.3)
        manager.governor.configure({"high_watermark": 0.02, "low_watermark": 0.01})  # the runner is far over the line now
        await until("shed")
        manager.governor.configure({"high_watermark": 0.9, "low_watermark": 0.8})
        assert steps()[:5] == ["shrink", "fewer_slots", "fewer_slots", "fewer_slots", "shed"], steps()
        mitigation = [e for e in events.since(0) if e["kind"] == "memory_mitigation" and e["data"]["step"] == "fewer_slots"]
        assert [e["data"]["max_num_seqs"] for e in mitigation] == [4, 2, 1]
        gen = manager.models["tiny"].generation_stats()
        assert gen["slot_limit"] == 1 and gen["preempted_total"] >= 1, gen
        with pytest.raises(MemoryPressure):  # shed while over: 503 + Retry-After at the API
            await drain(manager.generate("tiny", request))
        await until("shed_end")
        await until("raise_slots")  # after RECOVER_AFTER_S under the low line; the streams go on meanwhile
        assert manager.models["tiny"].memory.effective_slots == 2
        for chunks in await asyncio.gather(*tasks):
            assert chunks[-1].finish_reason in ("length", "stop") and chunks[-1].completion_tokens == sum(len(c.token_ids) for c in chunks)
        assert (await drain(manager.generate("tiny", GenerationRequest(SamplingParams(max_tokens=4, temperature=0.0), prompt="Hi"))))[-1].finish_reason
    finally:
        await manager.close()
