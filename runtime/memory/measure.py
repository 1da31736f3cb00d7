"""Benchmark of the memory governor on the demo transformer (not a timed test).

``python -m lastmile.runtime.memory.measure [--seconds 8] [--fusion-seconds 4]`` builds the demo models
in a temporary store and drives a real :class:`lastmile.runtime.manager.ModelManager` (governor,
forkserver runners, batcher, shared-memory pool; no HTTP) to print three tables:

1. **peak vs limit**: ``demo-lm`` (ONNX Runtime) with ``memory_limit_mb = 60`` under
   concurrent 128-row x 64-token requests (one alone needs ~61 MiB past "ready"). Peak is the
   model's footprint sampled every 20 ms (:func:`lastmile.runtime.memory.procfs.footprint`: the runner's
   private memory outside shared memory + the model's pool segments, each page once), with
   the ladder steps and answers seen.
2. **memory before load / after load / after unload**: PSS of this process + the forkserver
   (+ the runner while loaded), for ``demo-lm`` and ``demo-lm-ds`` (DeepSpeed, torch.export).
3. **throughput per graph-fusion level vs off**: closed loop, 4 concurrent 8-row x 32-token
   requests, both backends.

Figures of a run are in docs/memory.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lastmile.runtime.memory.procfs import FootprintWatch, forkserver_pids, pss
from lastmile.runtime.memory.units import MiB




async def _manager(store: Path) -> Any:
    from lastmile.models.settings import ModelSettings
    from lastmile.models.store import ModelStore
    from lastmile.runtime.events import EventLog
    from lastmile.runtime.manager import ModelManager
    from lastmile.runtime.forkserver import warm_up_async

    await warm_up_async()
    return ModelManager(ModelStore(store), ModelSettings(), EventLog(), memory={"sample_interval_s": 0.2})


async def peak_vs_limit(store: Path, seconds: float) -> dict[str, Any]:
    from lastmile.models.demo import example_inputs

    mm = await _manager(store)
    try:
        model = await mm.load("demo-lm", {"memory_limit_mb": 60, "max_batch_size": 256, "max_delay_ms": 20})
        with FootprintWatch(model.runners[0].pid, model.pool.prefix) as watch:
            big = example_inputs("lm", 128, seq=64)
            answers: dict[str, int] = {}

            async def one() -> None:
                try:
                    await mm.infer("demo-lm", big)
                    key = "ok"
                except Exception as exc:  # noqa: BLE001 - counted by kind
                    key = type(exc).__name__
                answers[key] = answers.get(key, 0) + 1

            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.gather(*(one() for _ in range(3)))
        events = mm.events.since(0, limit=2000)
        steps = [e["data"].get("step") for e in events if e["kind"] == "memory_mitigation"]
        cap_hits = sum(1 for e in events if e["kind"] == "memory_cap_hit")
        return {"limit_mb": 60, "peak": watch.peak, "samples": watch.samples, "answers": answers, "steps": steps,
                "cap_hits": cap_hits, "runner_alive": model.runners[0].alive}
    finally:
        await mm.close()


async def load_unload(store: Path, name: str) -> dict[str, float]:
    from lastmile.models.demo import example_inputs

    mm = await _manager(store)
    try:
        base = [os.getpid(), *forkserver_pids()]
        await asyncio.sleep(0.5)
        before = pss(base)
        model = await mm.load(name)
        for _ in range(5):
            await mm.infer(name, example_inputs("lm", 8, seq=32))
        loaded = pss(base + [model.runners[0].pid])
        await mm.unload(name)
        await asyncio.sleep(0.5)
        after = pss(base)
        return {"before_mb": before / MiB, "loaded_mb": loaded / MiB, "after_mb": after / MiB}
    finally:
        await mm.close()


async def fusion_throughput(store: Path, name: str, seconds: float) -> dict[str, float]:
    from lastmile.models.demo import example_inputs

    mm = await _manager(store)
    out: dict[str, float] = {}
    try:
        inputs = example_inputs("lm", 8, seq=32)
        for level in ("off", "basic", "extended", "all"):
            await mm.load(name, {"graph_fusion": level, "max_delay_ms": 1})
            for _ in range(10):
                await mm.infer(name, inputs)
            done = 0
            end = time.monotonic() + seconds

            async def client() -> None:
                nonlocal done
                while time.monotonic() < end:
                    await mm.infer(name, inputs)
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(client() for _ in range(4)))
            out[level] = done / (time.monotonic() - started)
            await mm.unload(name)
    finally:
        await mm.close()
    return out


async def main(seconds: float, fusion_seconds: float) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lastmile.models.demo import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        build_demo(store, names=["demo-lm", "demo-lm-ds"])
        r = await peak_vs_limit(store, seconds)
        p = r["peak"]
        print("1. peak under a limit-exceeding load (demo-lm, ONNX Runtime, memory_limit_mb 60, 3 x 128x64 concurrent)")
        print(f"   peak footprint {p['total_bytes'] / MiB:.1f} MiB = private {p['private_bytes'] / MiB:.1f} + pool "
              f"{p['pool_bytes'] / MiB:.1f}  -> {p['total_bytes'] / (r['limit_mb'] * MiB):.1%} of the limit "
              f"({r['samples']} samples); answers {r['answers']}; cap hits {r['cap_hits']}; ladder {r['steps']}; "
              f"runner alive {r['runner_alive']}")
        print("2. memory (PSS of daemon-side process + forkserver [+ runner])")
        print(f"   {'model':12} {'before MiB':>10} {'loaded MiB':>10} {'after MiB':>10} {'after-before':>13}")
        for name in ("demo-lm", "demo-lm-ds"):
            m = await load_unload(store, name)
            print(f"   {name:12} {m['before_mb']:10.1f} {m['loaded_mb']:10.1f} {m['after_mb']:10.1f} "
                  f"{m['after_mb'] - m['before_mb']:+13.1f}")
        print("3. throughput by graph_fusion (req/s, 4 clients x 8 rows x 32 tokens; ratio vs off)")
        for name in ("demo-lm", "demo-lm-ds"):
            t = await fusion_throughput(store, name, fusion_seconds)
            print(f"   {name:12} " + "  ".join(f"{k} {v:7.1f} ({v / t['off']:.2f}x)" for k, v in t.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the over-limit load")
    parser.add_argument("--fusion-seconds", type=float, default=4.0, help="length of each throughput run")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.fusion_seconds))
