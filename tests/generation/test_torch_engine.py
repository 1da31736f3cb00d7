"""The torch/DeepSpeed engine and its scheduler, in-process, on the tiny causal LM.

The reference is ``transformers.generate`` (fp32, greedy), one prompt at a time. No mocks:
the engine runs the real model through ``deepspeed.init_inference`` (plain torch on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lastmile.runtime.errors import QueueFull
from lastmile.runtime.generation.scheduler import GenerationScheduler
from lastmile.runtime.generation.torch_engine import TorchEngine
from lastmile.runtime.generation.types import (ContextOverflow, GenerationRequest,
                                               InvalidSamplingParams, SamplingParams)

PROMPTS = ["Hello" * i + " world, the capital of" for i in range(1, 9)]  # 8 different lengths


@pytest.fixture(scope="module")
def hf(tiny_lm: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm).eval()


def reference(hf, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    tok, model = hf
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


def run(sched: GenerationScheduler, reqs: dict, submit: bool = True) -> dict:
    if submit:
        for key, req in reqs.items():
            sched.submit(key, req)
    got = {k: {"ids": [], "text": "", "finish": None, "chunks": 0} for k in reqs}
    while sched.has_work():
        for key, c in sched.step():
            g = got[key]
            g["ids"] += c.token_ids
            g["text"] += c.text
            g["chunks"] += 1
            if c.finish_reason:
                g["finish"] = c.finish_reason
                g["usage"] = (c.prompt_tokens, c.completion_tokens)
    return got


@pytest.fixture(scope="module")
def engine(tiny_lm: Path):
    eng = TorchEngine(tiny_lm, max_num_seqs=8, max_context=2048, prefill_chunk=16)
    yield eng
    eng.close()


@pytest.fixture
def sched(engine, hf):
    return GenerationScheduler(engine, hf[0], max_queue=16)


def greedy(n: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_greedy_alone_equals_transformers_generate(sched, hf):
    ids = hf[0]("The capital of France is")["input_ids"]
    got = run(sched, {"a": GenerationRequest(greedy(40), prompt="The capital of France is")})["a"]
    assert got["ids"] == reference(hf, ids, 40)
    assert got["usage"] == (len(ids), len(got["ids"]))
    assert got["text"] == hf[0].decode(got["ids"], skip_special_tokens=True)


def test_eight_concurrent_prompts_equal_generate_token_for_token(sched, hf, engine):
    reqs = {i: GenerationRequest(greedy(30), prompt=p) for i, p in enumerate(PROMPTS)}
    got = run(sched, reqs)
    for i, p in enumerate(PROMPTS):
        assert got[i]["ids"] == reference(hf, hf[0](p)["input_ids"], 30), i
    assert engine.stats()["kv_used_bytes"] == 0  # every sequence's KV went back


def test_more_requests_than_slots_wait_fifo_and_still_match(tiny_lm, hf):
    eng = TorchEngine(tiny_lm, max_num_seqs=3, max_context=256, prefill_chunk=8, use_deepspeed=False)
    sched = GenerationScheduler(eng, hf[0])
    reqs = {i: GenerationRequest(greedy(12 + i), prompt=p) for i, p in enumerate(PROMPTS)}
    for k, r in reqs.items():
        sched.submit(k, r)
    assert eng.stats()["waiting"] == 8
    assert eng.stats()["running"] == 0
    first = sched.step()
    assert eng.stats()["running"] == 3 and eng.stats()["waiting"] == 5
    got = run(sched, reqs, submit=False)
    for key, c in first:
        got[key]["ids"][:0] = list(c.token_ids)
    for i, p in enumerate(PROMPTS):
        assert got[i]["ids"] == reference(hf, hf[0](p)["input_ids"], 12 + i)


def test_chat_messages_use_the_chat_template(sched, hf):
    msgs = ({"role": "user", "content": "What is the capital of France?"},)
    text = hf[0].apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)
    ids = hf[0](text, add_special_tokens=False)["input_ids"]
    got = run(sched, {"c": GenerationRequest(greedy(10), messages=msgs)})["c"]
    assert got["usage"][0] == len(ids)
    assert got["ids"] == reference(hf, ids, 10)


def test_stop_string_ends_before_it_and_text_excludes_it(sched, hf):
    full = run(sched, {"f": GenerationRequest(greedy(40), prompt="Hello world")})["f"]["text"]
    stop = full[12:15]
    assert len(stop) == 3 and stop not in full[:12]
    got = run(sched, {"s": GenerationRequest(greedy(40, stop=(stop,)), prompt="Hello world")})["s"]
    assert got["finish"] == "stop"
    assert got["text"] == full[:full.index(stop)]


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(sched):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = run(sched, {"x": GenerationRequest(p, prompt="Hello")})["x"]["ids"]
    crowd = {i: GenerationRequest(SamplingParams(max_tokens=20, temperature=1.0), prompt=q)
             for i, q in enumerate(PROMPTS[:4])}
    crowd["x"] = GenerationRequest(p, prompt="Hello")
    assert run(sched, crowd)["x"]["ids"] == alone
    other = run(sched, {"y": GenerationRequest(SamplingParams(max_tokens=20, temperature=0.9, seed=8),
                                               prompt="Hello")})["y"]["ids"]
    assert other != alone


def test_context_overflow_names_the_field_and_counts(sched, hf, engine):
    n = len(hf[0]("Hello world")["input_ids"])
    with pytest.raises(ContextOverflow) as e:
        sched.submit("o", GenerationRequest(SamplingParams(max_tokens=2048), prompt="Hello world"))
    assert (e.value.prompt_tokens, e.value.max_tokens, e.value.max_context, e.value.field) == (n, 2048, 2048, "max_tokens")
    with pytest.raises(ContextOverflow) as e:
        sched.submit("o", GenerationRequest(SamplingParams(max_tokens=1), prompt="Hello " * 3000))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidSamplingParams) as e:
        sched.submit("o", GenerationRequest(SamplingParams(top_p=0.0), prompt="Hi"))
    assert e.value.field == "top_p"
    assert not sched.has_work() and engine.stats()["waiting"] == 0


def test_queue_is_bounded(tiny_lm, hf):
    eng = TorchEngine(tiny_lm, max_num_seqs=1, max_context=256, use_deepspeed=False)
    sched = GenerationScheduler(eng, hf[0], max_queue=2)
    for k in range(2):
        sched.submit(k, GenerationRequest(greedy(5), prompt="Hi"))
    with pytest.raises(QueueFull):
        sched.submit(9, GenerationRequest(greedy(5), prompt="Hi"))
    sched.step()  # one admitted, one waits: room for one more
    sched.submit(9, GenerationRequest(greedy(5), prompt="Hi"))


def test_cancel_frees_the_slot_and_kv_at_once(sched, engine):
    for k in range(4):
        sched.submit(k, GenerationRequest(greedy(200), prompt=PROMPTS[k]))
    for _ in range(10):
        sched.step()
    before = engine.stats()
    assert before["running"] == 4 and before["kv_used_bytes"] > 0
    assert sched.cancel(0) and sched.cancel(3)
    after = engine.stats()
    assert after["running"] == 2 and after["kv_used_bytes"] < before["kv_used_bytes"]
    sched.cancel(1), sched.cancel(2)
    assert engine.stats()["kv_used_bytes"] == 0 and not sched.has_work()


def test_fewer_slots_preempt_the_newest_and_recompute_gives_the_same_tokens(sched, hf, engine):
    """The memory ladder's "fewer slots": 6 greedy streams decode, the limit drops to 2. The 4
    newest leave the engine at once (their KV freed), wait, resume by recompute; every stream
    still equals transformers.generate token for token and nothing in it repeats or goes missing."""
    reqs = {i: GenerationRequest(greedy(20), prompt=p) for i, p in enumerate(PROMPTS[:6])}
    got = {k: [] for k in reqs}
    for key, req in reqs.items():
        sched.submit(key, req)
    for _ in range(6):
        for key, c in sched.step():
            got[key] += c.token_ids
    before = engine.stats()["kv_used_bytes"]
    assert sched.set_slots(2) == 4
    assert engine.stats()["kv_used_bytes"] < before / 2 and engine.stats()["running"] + engine.stats()["waiting"] == 2
    stats = sched.stats()
    assert stats["slot_limit"] == 2 and stats["preempted_total"] == 4 and stats["waiting"] == 4
    peak = 0
    while sched.has_work():
        for key, c in sched.step():
            got[key] += c.token_ids
        peak = max(peak, engine.stats()["running"])
    assert peak == 2
    for i, p in enumerate(PROMPTS[:6]):
        assert got[i] == reference(hf, hf[0](p)["input_ids"], 20), i
    sched.set_slots(100)
    assert sched.slot_limit == engine.max_num_seqs


def test_deadline_ends_with_timeout(sched):
    sched.submit("d", GenerationRequest(greedy(500), prompt="Hi", deadline_s=0.2))
    last = None
    while sched.has_work():
        for _, c in sched.step():
            last = c
    assert last is not None and last.finish_reason == "timeout" and last.completion_tokens < 500


def test_long_prompt_prefill_is_interleaved_with_running_streams(tiny_lm, hf):
    """A 2,000-token prompt arriving costs running streams one chunk per step, not a stall:
    every step while it is prefilled, each running stream still gets its token."""
    eng = TorchEngine(tiny_lm, max_num_seqs=4, max_context=2100, prefill_chunk=128, use_deepspeed=False)
    sched = GenerationScheduler(eng, hf[0])
    for k in range(3):
        sched.submit(k, GenerationRequest(greedy(100), prompt=PROMPTS[k]))
    sched.step()
    sched.step()
    long_ids = (hf[0]("Hello world " * 1000)["input_ids"])[:2000]
    sched.submit("long", GenerationRequest(greedy(4), prompt_token_ids=tuple(long_ids)))
    steps = 0
    while True:
        chunks = dict(sched.step())
        steps += 1
        assert {0, 1, 2} <= set(chunks), "a running stream missed a step while the long prompt was prefilled"
        if "long" in chunks:
            break
    assert steps == -(-2000 // eng.busy_prefill_chunk)  # ceil: one small chunk per step while others run


def test_fresh_prompts_prefill_together_and_sixteen_of_different_lengths_equal_generate(tiny_lm, hf):
    """Fresh prompts go in one left-padded call (alone, a prompt token costs about twice what it
    costs in a group), while others decode too; 16 prompts of different lengths, joining in two
    waves and leaving at different lengths, still equal transformers.generate token for token."""
    eng = TorchEngine(tiny_lm, max_num_seqs=16, max_context=512, prefill_chunk=256, busy_group_tokens=128)
    calls: list[tuple[int, int]] = []
    model = eng._model

    def counted(**kw):
        calls.append(tuple(kw["input_ids"].shape))
        return model(**kw)

    eng._model = counted
    sched = GenerationScheduler(eng, hf[0])
    prompts = ["Hello" * (i % 8 + 1) + " world" * (i // 8) + ", the capital of" for i in range(16)]
    first = {i: GenerationRequest(greedy(6 + i), prompt=p) for i, p in enumerate(prompts[:8])}
    got = {i: [] for i in range(16)}
    for k, r in first.items():
        sched.submit(k, r)
    for _ in range(3):
        for k, c in sched.step():
            got[k] += c.token_ids
    assert eng.stats()["running"] == 8
    assert any(rows > 1 and width > 1 for rows, width in calls), calls  # one call prefilled several prompts
    calls.clear()
    for i, p in enumerate(prompts[8:], start=8):
        sched.submit(i, GenerationRequest(greedy(6 + i), prompt=p))
    while sched.has_work():
        for k, c in sched.step():
            got[k] += c.token_ids
    joined = [(rows, width) for rows, width in calls if width > 1]
    assert joined and max(rows for rows, _ in joined) > 1  # the second wave joined running streams in groups
    assert all(rows * width <= 128 for rows, width in joined)  # the busy budget holds
    for i, p in enumerate(prompts):
        assert got[i] == reference(hf, hf[0](p)["input_ids"], 6 + i), i
    assert eng.stats()["kv_used_bytes"] == 0
    eng.close()


def test_a_first_token_is_not_held_back_by_a_longer_prompts_chunk_in_the_same_step(tiny_lm, hf):
    """A prompt whose prefill ends in a step sends its first token without that step also
    prefilling a chunk of a longer prompt (it waits for the next step); tokens do not change."""
    eng = TorchEngine(tiny_lm, max_num_seqs=4, max_context=512, prefill_chunk=32, use_deepspeed=False)
    ids = hf[0]("Hello world " * 80)["input_ids"]
    a, b = ids[:40], ids[:100]
    eng.add("a", a, greedy(4))
    eng.add("b", b, greedy(4))
    assert eng.step() == []  # 32 of a's 40 tokens
    second = dict(eng.step())
    assert set(second) == {"a"}
    assert next(s for s in eng._prefilling if s.seq_id == "b").done == 0  # no chunk of b in that step
    got = {"a": [second["a"]], "b": []}
    while eng.has_work():
        for seq, t in eng.step():
            got[seq].append(t)
            if len(got[seq]) == 4:
                eng.cancel(seq)
    assert got["a"] == reference(hf, a, 4) and got["b"] == reference(hf, b, 4)
    eng.close()
