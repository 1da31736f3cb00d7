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


def _reference(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for p in prompts:
        x = torch.tensor([p])
        out.append(hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0, len(p):].tolist())
    return out


def _run_to_the_end(eng: OrtGenAIEngine, got: dict, n: int) -> dict:
    """Step until no work is left, each sequence's tokens appended to ``got`` and the sequence
    cancelled at ``n`` of them."""
    while eng.has_work():
        for seq, t in eng.step():
            got.setdefault(seq, []).append(t)
            if len(got[seq]) == n:
                eng.cancel(seq)
    return got


def test_sixteen_batched_sequences_of_different_lengths_equal_generate_while_others_leave_and_join(folder: Path):
    """One decode call serves every running row: rows of different lengths, cancelled rows
    (their slot taken by the last one), rows joining mid-way and a long prompt prefilled in
    chunks beside them must all give transformers' own greedy tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok("Hello " * (1 + 3 * i) + "the capital of")["input_ids"] for i in range(16)]
    prompts.append(tok("word " * 100 + "end")["input_ids"])  # a long one: chunked, alone
    n = 12
    ref = _reference(folder, prompts, n)
    eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=16, max_context=512,
                                        prefill_chunk=64)
    assert eng.busy_prefill_chunk < len(prompts[-1])
    got: dict[int, list[int]] = {}
    for i in range(12):
        eng.add(i, prompts[i], SamplingParams(max_tokens=n, temperature=0.0))
        got[i] = []
    steps = 0
    while eng.has_work():
        steps += 1
        if steps == 3:  # two rows leave from the middle of the batch ...
            eng.cancel(2)
            eng.cancel(5)
            got.pop(2), got.pop(5)
            for i in range(12, 17):  # ... and five join, the long one among them
                eng.add(i, prompts[i], SamplingParams(max_tokens=n, temperature=0.0))
                got[i] = []
        for seq, t in eng.step():
            got[seq].append(t)
            if len(got[seq]) == n:
                eng.cancel(seq)
        assert eng.stats()["running"] <= 16
    for i, tokens in got.items():
        assert tokens == ref[i], i
    assert {k: eng.stats()[k] for k in ("running", "waiting", "kv_used_bytes")} == {"running": 0, "waiting": 0, "kv_used_bytes": 0}
    eng.close()


def test_a_kept_prompt_prefix_is_reused_and_changes_no_token(folder: Path):
    """Prompts that share a long start (a chat template's system prompt) prefill only what
    differs once the first of them ran; the answers are transformers' own all the same."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    system = tok("You are a helpful assistant. " * 8)["input_ids"]
    prompts = [system + tok(f"question number {i} is")["input_ids"] for i in range(5)]
    prompts[4] = system[:20] + tok("something else entirely")["input_ids"]  # shares only the first block
    n = 8
    ref = _reference(folder, prompts, n)
    eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=4, max_context=256)
    got = {}
    for i, p in enumerate(prompts):
        if i == 2:
            eng.shrink()  # the ladder's first step drops it: the next prompt prefills all, keeps it again
        eng.add(i, p, SamplingParams(max_tokens=n, temperature=0.0))
        got[i] = []
        _run_to_the_end(eng, got, n)
    assert [got[i] for i in range(5)] == ref
    stats = eng.stats()
    assert stats["prefix_hits"] == 3 and stats["prefix_hit_tokens"] >= 2 * (len(system) // 16) * 16 + 16
    assert 0 < stats["prefix_cache_bytes"] <= 64 << 20
    eng.close()


def test_short_prompts_behind_a_long_one_start_first_and_change_no_token(folder: Path):
    """A long prompt that arrived first is prefilled in chunks while the short prompts after it
    start at once (their first tokens come before its first), and nobody's tokens change."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    long = tok("a long document about many things " * 40)["input_ids"][:600]
    prompts = [long] + [tok(f"short question {i} is")["input_ids"] for i in range(3)]
    n = 6
    ref = _reference(folder, prompts, n)
    eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=4, max_context=1024, prefill_chunk=128)
    for i, p in enumerate(prompts):
        eng.add(i, p, SamplingParams(max_tokens=n, temperature=0.0))
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    first: list[int] = []
    while eng.has_work():
        for seq, t in eng.step():
            if not got[seq]:
                first.append(seq)
            got[seq].append(t)
            if len(got[seq]) == n:
                eng.cancel(seq)
    assert first[-1] == 0, first  # the long prompt's first token came last
    assert [got[i] for i in range(len(prompts))] == ref
    eng.close()


def test_first_tokens_are_not_held_back_by_a_long_prompts_chunk_in_the_same_step(folder: Path):
    """Prompts that start like an earlier one (their prefix KV copied in, the rest prefilled in
    chunks) finish their prefill in one step beside a long prompt: that step sends their first
    tokens without also prefilling a chunk of the long one (which waits for the next step);
    nobody's tokens change."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    system = tok("you are a helpful assistant who answers every question briefly " * 3)["input_ids"][:40]
    long = tok("a long document about many things " * 40)["input_ids"][:600]
    shorts = [system + tok(f" question {i} is")["input_ids"] for i in range(3)]
    n = 5
    ref = _reference(folder, [long] + shorts, n)
    eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=4, max_context=1024, prefill_chunk=128)
    eng.add("warm", system + [5], SamplingParams(max_tokens=1, temperature=0.0))  # keeps the shared prefix's KV
    _run_to_the_end(eng, {}, 1)
    eng.add(0, long, SamplingParams(max_tokens=n, temperature=0.0))
    for i, p in enumerate(shorts, start=1):
        eng.add(i, p, SamplingParams(max_tokens=n, temperature=0.0))
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    first = dict(eng.step())
    assert set(first) == {1, 2, 3} and eng.prefixes.hits >= 3
    assert next(s for s in eng._prefilling if s.seq_id == 0).length == 0  # no chunk of it in that step
    for seq, t in first.items():
        got[seq].append(t)
    _run_to_the_end(eng, got, n)
    assert [got[i] for i in range(4)] == ref
    eng.close()


def test_an_error_in_one_sequences_sampling_ends_it_alone(folder: Path, monkeypatch):
    """A sampled sequence whose sampler raises ends with a failure; the greedy ones beside it
    in the same decode call go on to their normal end."""
    from lastmile.runtime.generation import ort_engine

    eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=4, max_context=128)
    real = ort_engine.sample

    def exploding(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("probability tensor contains nan")
        return real(logits, params, generator)

    monkeypatch.setattr(ort_engine, "sample", exploding)
    eng.add(0, [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0))
    eng.add(1, [1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0.8, seed=666))
    eng.add(2, [5, 6], SamplingParams(max_tokens=5, temperature=0.0))
    counts = {0: 0, 2: 0}
    for _ in range(6):
        for seq, _t in eng.step():
            assert seq != 1
            counts[seq] += 1
    failed = eng.take_failures()
    assert [f[0] for f in failed] == [1] and "nan" in failed[0][1]
    assert counts == {0: 6, 2: 6} and eng.stats()["running"] == 2
    eng.close()
