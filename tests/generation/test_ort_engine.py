"""The ONNX Runtime GenAI engine on the tiny causal LM: built from the HF folder by
ORT-GenAI's builder (cached beside it), fp32 greedy output equal to transformers.generate."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from lastmile.runtime.generation.ort_engine import CACHE_DIR, OrtGenAIEngine, build_ort_genai
from lastmile.runtime.generation.scheduler import GenerationScheduler
from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

PROMPTS = ["Hello" * i + " world, the capital of" for i in range(1, 9)]


@pytest.fixture(scope="module")
def folder(tiny_lm: Path, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("ort") / "tiny"
    shutil.copytree(tiny_lm, dst)
    return dst


def test_fp32_greedy_equals_generate_with_eight_concurrent_prompts(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    phases = []
    eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=8, max_context=512,
                                        prefill_chunk=8, on_phase=lambda n, d: phases.append(n))
    assert phases == ["building", "built"]
    built = list((folder / CACHE_DIR).iterdir())
    assert len(built) == 1 and built[0].name.startswith("fp32-")
    t0 = time.monotonic()
    assert build_ort_genai(folder, "fp32") == built[0] and time.monotonic() - t0 < 5  # cached
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    sched = GenerationScheduler(eng, tok)
    for i, p in enumerate(PROMPTS):
        sched.submit(i, GenerationRequest(SamplingParams(max_tokens=20, temperature=0.0), prompt=p))
    got = {i: [] for i in range(8)}
    finish = {}
    while sched.has_work():
        for k, c in sched.step():
            got[k] += c.token_ids
            if c.finish_reason:
                finish[k] = c.finish_reason
    for i, p in enumerate(PROMPTS):
        x = torch.tensor([tok(p)["input_ids"]])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)[0, x.shape[1]:]
        assert got[i] == ref.tolist(), i
        assert finish[i] == "length"
    assert eng.stats()["running"] == 0 and eng.stats()["kv_used_bytes"] == 0
    # a sequence arriving while another runs joins at the next step (no head-of-line blocking)
    sched.submit("a", GenerationRequest(SamplingParams(max_tokens=60, temperature=0.0), prompt="Hello"))
    for _ in range(5):
        sched.step()
    sched.submit("b", GenerationRequest(SamplingParams(max_tokens=5, temperature=0.0), prompt="Hi"))
    finished = []
    while sched.has_work():
        finished += [k for k, c in sched.step() if c.finish_reason]
    assert finished == ["b", "a"]
    # cancel mid-stream frees the slot at once
    sched.submit("c", GenerationRequest(SamplingParams(max_tokens=400, temperature=0.0), prompt="Hi"))
    for _ in range(3):
        sched.step()
    assert eng.stats()["running"] == 1
    sched.cancel("c")
    assert eng.stats()["running"] == 0 and not sched.has_work()
    eng.close()
