"""What constrained decoding costs per token, in process (no daemon):

    python -m lastmile.runtime.generation.measure_constraints FOLDER --engine ort-genai --precision int4

runs ``--streams`` (16) greedy chat streams of ``--tokens`` (32) new tokens, once all free and
once with half of them under a JSON schema (a string of at least 4,000 characters: they run to
max_tokens as the free ones do, so the
batch keeps its size and the difference is the mask),
alternating passes, and prints the medians of aggregate tokens/s and the time spent in the
mask (``SeqConstraint.allowed`` + ``consume``) per constrained token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SCHEMA = {"type": "object", "properties": {"summary": {"type": "string", "minLength": 4000}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["summary", "tags"], "additionalProperties": False}


def _engine(folder: str, engine: str, precision: str, streams: int) -> Any:
    if engine == "ort-genai":
        from lastmile.runtime.generation.ort_engine import OrtGenAIEngine

        return OrtGenAIEngine.from_hf_folder(folder, precision=precision, max_num_seqs=streams, max_context=512, threads=1)
    from lastmile.runtime.generation.torch_engine import TorchEngine

    return TorchEngine(folder, max_num_seqs=streams, max_context=512, use_deepspeed=False, threads=1)


def one_pass(sched: Any, streams: int, tokens: int, constrained: int) -> tuple[float, int, float]:
    """Aggregate tokens/s, constrained tokens and the seconds spent in their masks."""
    from lastmile.runtime.generation import constraints
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    spent = [0.0]
    allowed, consume = constraints.SeqConstraint.allowed, constraints.SeqConstraint.consume

    def timed(fn):
        def wrap(self, *a):
            t = time.perf_counter()
            try:
                return fn(self, *a)
            finally:
                spent[0] += time.perf_counter() - t
        return wrap

    constraints.SeqConstraint.allowed, constraints.SeqConstraint.consume = timed(allowed), timed(consume)
    try:
        for i in range(streams):
            c = {"kind": "json_schema", "schema": SCHEMA, "field": "response_format"} if i < constrained else None
            msgs = ({"role": "user", "content": f"Describe the city number {i} in one JSON object."},)
            sched.submit(i, GenerationRequest(SamplingParams(max_tokens=tokens, temperature=0.0), messages=msgs, constraint=c))
        n, n_c, t0 = 0, 0, time.perf_counter()
        while sched.has_work():
            for key, chunk in sched.step():
                n += len(chunk.token_ids)
                n_c += len(chunk.token_ids) if key < constrained else 0
        return n / (time.perf_counter() - t0), n_c, spent[0]
    finally:
        constraints.SeqConstraint.allowed, constraints.SeqConstraint.consume = allowed, consume


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--engine", default="ort-genai", choices=["ort-genai", "deepspeed"])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from lastmile.runtime.generation.scheduler import GenerationScheduler

    tok = AutoTokenizer.from_pretrained(args.folder)
    sched = GenerationScheduler(_engine(args.folder, args.engine, args.precision, args.streams), tok)
    half = args.streams // 2
    one_pass(sched, args.streams, 4, half)  # warm up (and compile the schema once)
    free, mixed, per_token = [], [], []
    for _ in range(args.passes):
        free.append(one_pass(sched, args.streams, args.tokens, 0)[0])
        rate, n_c, spent = one_pass(sched, args.streams, args.tokens, half)
        mixed.append(rate)
        per_token.append(spent / max(1, n_c))
    out = {"engine": args.engine, "precision": args.precision if args.engine == "ort-genai" else "fp32",
           "streams": args.streams, "constrained": half, "free_tok_s": round(statistics.median(free), 1),
           "mixed_tok_s": round(statistics.median(mixed), 1),
           "ratio": round(statistics.median(mixed) / statistics.median(free), 3),
           "mask_us_per_constrained_token": round(statistics.median(per_token) * 1e6, 1),
           "compile": sched.stats().get("constraint_compile_s_max")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
