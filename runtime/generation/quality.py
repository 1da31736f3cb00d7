"""``precision = "auto"``: the cheapest ORT-GenAI precision whose answers stay close to the source's.

Measured once per source (its hash) at the first load and kept beside the builds in
``MODEL/.lastmile/ort-genai/quality-<source hash>.json``: greedy answers to a small fixed set of
chat prompts from ``transformers`` in fp32 on the folder (the reference: what the model itself
says) against each candidate built by the ORT-GenAI builder and run by this package's engine.
Agreement is the mean share of the reference's tokens that a candidate's answer repeats before
it first differs (1.0: every answer equal). The cheapest candidate with agreement of at least
``MIN_AGREEMENT`` is chosen, fp32 when none is. A source already quantized to 4 bits (a Q4 GGUF)
is not quantized to 4 bits again: int4 is not a candidate for it (rounding rounded weights
again is what made the int4 answers drift: "Paris, capital of the French language, culture,
and culture").

The measurement runs in a subprocess (transformers' fp32 model and each candidate's session
come and go there; none of it stays in the runner): ``python -m
lastmile.runtime.generation.quality FOLDER``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lastmile.runtime.generation.gguf_import import SOURCE_FILE
from lastmile.runtime.generation.ort_engine import CACHE_DIR, build_ort_genai, source_hash

#: Cheapest first: what a candidate costs per token and in memory.
CANDIDATES = ("int4", "int8")
#: A candidate must repeat at least this share of the reference's greedy tokens (mean over the
#: prompts): 0.9 x what llama.cpp's own server reaches on the same prompts with the Q4_1 GGUF of SmolLM2-135M
#: (0.45 of the characters; int8 here 0.55, int4 0.25: docs/generation.md).
MIN_AGREEMENT = 0.4
NEW_TOKENS = 32
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Explain in one sentence why the sky is blue.",
    "Give me a synonym for happy.",
    "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.",
)


def source_bits(folder: Path) -> int | None:
    """Bits per weight of the file the folder was imported from (None: not known, a plain
    fp16/fp32 checkpoint)."""
    try:
        return int(json.loads((Path(folder) / SOURCE_FILE).read_text())["bits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def candidates(folder: Path) -> tuple[str, ...]:
    bits = source_bits(folder)
    return tuple(p for p in CANDIDATES if not (p == "int4" and bits is not None and bits <= 4))


def record_path(folder: Path) -> Path:
    return Path(folder) / CACHE_DIR / f"quality-{source_hash(Path(folder))}.json"


def recorded(folder: Path) -> dict[str, Any] | None:
    """The measurement of this source, when it was made."""
    try:
        return json.loads(record_path(folder).read_text())
    except (OSError, ValueError):
        return None


def choose(agreement: dict[str, float], order: tuple[str, ...]) -> str:
    """The cheapest precision of ``order`` whose agreement reaches ``MIN_AGREEMENT``, else fp32."""
    return next((p for p in order if agreement.get(p, 0.0) >= MIN_AGREEMENT), "fp32")


def auto_precision(folder: str | Path, *, threads: int = 0, on_phase: Callable[[str, dict], None] | None = None,
                   timeout_s: float = 3600.0) -> dict[str, Any]:
    """The record for ``folder`` (measured now in a subprocess when there is none):
    ``{"chosen", "agreement": {precision: share}, "reference", "prompts", "new_tokens", ...}``."""
    folder = Path(folder)
    found = recorded(folder)
    if found is not None:
        return found
    if on_phase:
        on_phase("measuring", {"what": "precision by quality", "candidates": list(candidates(folder))})
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "lastmile.runtime.generation.quality", str(folder), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    found = recorded(folder)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise RuntimeError("measuring the precision by quality failed: " + " | ".join(tail))
    if on_phase:
        on_phase("measured", {"chosen": found["chosen"], "agreement": found["agreement"]})
    return found


def _prompts(tokenizer: Any) -> list[list[int]]:
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for q in PROMPTS]


def reference_answers(folder: Path, prompts: list[list[int]], eos: frozenset[int]) -> list[list[int]]:
    """transformers' greedy fp32 answers, one prompt at a time (no padding to change them)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones((1, len(p)), dtype=torch.long))[0, len(p):].tolist()
            out.append(_until_eos(ids, eos))
    return out


def engine_answers(folder: Path, precision: str, prompts: list[list[int]], threads: int) -> list[list[int]]:
    """A candidate's greedy answers, all prompts batched in this package's engine."""
    from lastmile.runtime.generation.ort_engine import OrtGenAIEngine
    from lastmile.runtime.generation.types import SamplingParams

    engine = OrtGenAIEngine.from_hf_folder(folder, precision=precision, max_num_seqs=len(prompts),
                                           max_context=max(len(p) for p in prompts) + NEW_TOKENS, threads=threads)
    answers: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add(i, p, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    while engine.has_work():
        for i, tok in engine.step():
            answers[i].append(tok)
            if tok in engine.eos_token_ids or len(answers[i]) >= NEW_TOKENS:
                engine.cancel(i)
    engine.close()
    return [_until_eos(answers[i], engine.eos_token_ids) for i in range(len(prompts))]


def _until_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def agreement(reference: list[list[int]], answers: list[list[int]]) -> float:
    """Mean share of each reference answer repeated before the first difference."""
    shares = []
    for ref, got in zip(reference, answers):
        same = 0
        for a, b in zip(ref, got):
            if a != b:
                break
            same += 1
        shares.append(same / max(1, len(ref)))
    return sum(shares) / max(1, len(shares))


def measure(folder: Path, threads: int = 0) -> dict[str, Any]:
    """Build each candidate, compare its answers with the reference, write the record."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    prompts = _prompts(tokenizer)
    reference = reference_answers(folder, prompts, eos_ids)
    order = candidates(folder)
    shares, exact = {}, {}
    for precision in order:
        build_ort_genai(folder, precision, threads=threads)
        answers = engine_answers(folder, precision, prompts, threads)
        shares[precision] = round(agreement(reference, answers), 4)
        exact[precision] = sum(a == r for a, r in zip(answers, reference))
    record = {"chosen": choose(shares, order), "agreement": shares, "exact": exact, "candidates": list(order),
              "min_agreement": MIN_AGREEMENT, "reference": "transformers fp32 greedy", "prompts": len(prompts),
              "new_tokens": NEW_TOKENS, "source_bits": source_bits(folder), "measure_s": round(time.monotonic() - started, 1)}
    path = record_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.threads)))
