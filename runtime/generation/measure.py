"""Measure generation: the engine in-process (the limit) against ``ModelManager.generate``
(runner process, pipes, asyncio) at 1, 4 and 16 concurrent streams, and the inter-token
latency of running streams while a 2,000-token prompt arrives.

    python -m lastmile.runtime.generation.measure STORE MODEL [--engine deepspeed|ort-genai]
        [--precision int4] [--threads 1] [--tokens 32] [--repeat 3]

Passes alternate (in-process, daemon, in-process, ...) and the medians are printed: the
machine is shared and noisy, a single pass says little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

QUESTION = "Tell me a long story about a robot who learns to paint."


def _request(tokens: int, messages: bool = True):
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    return GenerationRequest(SamplingParams(max_tokens=tokens, temperature=0.0),
                             messages=({"role": "user", "content": QUESTION},))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def load_in_process(folder: Path, settings: dict[str, Any]):
    from transformers import AutoTokenizer

    from lastmile.models.settings import ModelSettings
    from lastmile.runtime.generation.config import GenerationSettings, causal_lm_config
    from lastmile.runtime.generation.scheduler import GenerationScheduler
    from lastmile.runtime.generation.serve import load

    cfg = causal_lm_config(folder) or {}
    gs = GenerationSettings.from_settings(ModelSettings().overlay(settings), cfg)
    engine, tok = load(str(folder), gs)
    return GenerationScheduler(engine, tok, max_queue=1024)


def run_in_process(sched, streams: int, tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    itl: list[float] = []
    n = 0
    for i in range(streams):
        sched.submit(i, _request(tokens))
    while sched.has_work():
        for key, c in sched.step():
            now = time.perf_counter()
            n += len(c.token_ids)
            if key not in first:
                first[key] = now - t0
            else:
                itl.append(now - last[key])
            last[key] = now
    wall = time.perf_counter() - t0
    return {"tok_s": n / wall, "ttft_p50_ms": 1000 * _pct(list(first.values()), 0.5), "itl_p50_ms": 1000 * (_pct(itl, 0.5) or 0),
            "itl_p99_ms": 1000 * (_pct(itl, 0.99) or 0), "tokens": n}


async def run_manager(manager, name: str, streams: int, tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: list[float] = []
    itl: list[float] = []
    counts: list[int] = []

    async def one() -> None:
        last = None
        n = 0
        async for c in manager.generate(name, _request(tokens)):
            now = time.perf_counter()
            n += len(c.token_ids)
            if last is None:
                first.append(now - t0)
            else:
                itl.append(now - last)
            last = now
        counts.append(n)

    await asyncio.gather(*(one() for _ in range(streams)))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(counts) / wall, "ttft_p50_ms": 1000 * _pct(first, 0.5), "itl_p50_ms": 1000 * (_pct(itl, 0.5) or 0),
            "itl_p99_ms": 1000 * (_pct(itl, 0.99) or 0), "tokens": sum(counts)}


def itl_while_long_prompt_arrives(sched, running: int = 3, long_tokens: int = 2000) -> dict[str, Any]:
    """Inter-token latency of ``running`` streams: steady, then while a long prompt prefills."""
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    for i in range(running):
        sched.submit(("r", i), _request(400))
    last: dict[Any, float] = {}
    steady: list[float] = []
    during: list[float] = []
    phase = steady
    steps = 0
    long_done = False
    while sched.has_work():
        if steps == 20:
            vocab = len(sched.tokenizer)
            ids = tuple((i * 7919) % (vocab - 10) + 5 for i in range(long_tokens))
            sched.submit("long", GenerationRequest(SamplingParams(max_tokens=2, temperature=0.0), prompt_token_ids=ids))
            phase = during
        for key, c in sched.step():
            now = time.perf_counter()
            if key == "long":
                long_done = True
                continue
            if key in last:
                phase.append(now - last[key])
            last[key] = now
        steps += 1
        if long_done:
            for i in range(running):
                sched.cancel(("r", i))
            sched.cancel("long")
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {"steady_p50_ms": ms(_pct(steady, 0.5)), "steady_p99_ms": ms(_pct(steady, 0.99)),
            "during_p50_ms": ms(_pct(during, 0.5)), "during_p99_ms": ms(_pct(during, 0.99)),
            "during_max_ms": ms(max(during) if during else None), "samples": [len(steady), len(during)]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from lastmile.models.settings import ModelSettings
    from lastmile.models.store import ModelStore
    from lastmile.runtime.events import EventLog
    from lastmile.runtime.manager import ModelManager
    from lastmile.runtime.forkserver import warm_up

    settings = {"engine": args.engine, "precision": args.precision, "threads": args.threads,
                "max_num_seqs": 16, "max_context": args.context}
    folder = Path(args.store) / args.model
    sched = load_in_process(folder, settings)
    if args.only_long_prompt:
        out = {"settings": settings, "long_prompt": itl_while_long_prompt_arrives(sched)}
        sched.engine.close()
        return out
    await asyncio.get_running_loop().run_in_executor(None, warm_up)
    manager = ModelManager(ModelStore(args.store), ModelSettings(), EventLog())
    await manager.load(args.model, settings)
    results: dict[str, Any] = {"settings": settings, "tokens_per_stream": args.tokens}
    try:
        for streams in (1, 4, 16):
            ip, mg = [], []
            for _ in range(args.repeat):  # alternating passes
                ip.append(run_in_process(sched, streams, args.tokens))
                mg.append(await run_manager(manager, args.model, streams, args.tokens))
            med = lambda rows, k: round(statistics.median(r[k] for r in rows), 2)  # noqa: E731
            results[f"{streams}_streams"] = {
                "in_process": {k: med(ip, k) for k in ip[0]},
                "generate": {k: med(mg, k) for k in mg[0]},
                "ratio_tok_s": round(med(mg, "tok_s") / med(ip, "tok_s"), 3),
            }
            print(json.dumps({f"{streams}_streams": results[f"{streams}_streams"]}), flush=True)
        if args.long_prompt:
            results["long_prompt"] = itl_while_long_prompt_arrives(sched)
            print(json.dumps({"long_prompt": results["long_prompt"]}), flush=True)
    finally:
        await manager.close()
        sched.engine.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("model")
    p.add_argument("--engine", default="ort-genai", choices=("ort-genai", "deepspeed"))
    p.add_argument("--precision", default="int4", choices=("int4", "int8", "fp32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--long-prompt", action="store_true", help="also measure ITL while a 2,000-token prompt arrives")
    p.add_argument("--only-long-prompt", action="store_true", help="only the long-prompt measurement, in-process")
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
