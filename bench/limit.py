"""The physical limit: the model's backend called in-process, no server, no IPC.

``python -m bench.limit --store DIR --model NAME [--threads N] [--batches 1,8,32]
[--duration-s 2] [--json]`` builds the backend exactly as a runner does and calls
``backend.run`` back to back for each batch size: rows/s per batch size (the best is what the
hardware can do) and the latency of one call (the floor of any server's latency). Runs in its
own process so its threads never compete with a server under test.

One call is timed twice: back to back, and *paced* (a pause of ``PACE_S`` before each call,
as the model sees one client whose every request crosses HTTP). On these VMs a model that
idled for a millisecond runs measurably slower (caches and a descheduled vCPU: demo-lm-ds
1.1 -> 1.8 ms a call), for any server alike; the paced figure is the fair floor for the
1-client latency of a server, the back-to-back one the optimistic floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from bench.common import inputs_for, load_backend

PACE_S = 0.001
PACED_CALLS = 200


def measure(store: str, model: str, *, settings: dict[str, Any], batches: list[int], duration_s: float = 2.0,
            seq: int = 16, input_data: str | None = None) -> dict[str, Any]:
    backend = load_backend(store, model, settings)
    rows_out: dict[str, Any] = {}
    try:
        for rows in batches:
            inputs, _ = inputs_for(store, model, rows, seq, input_data)
            for _ in range(5):
                backend.run(inputs)
            lat = []
            clock = time.perf_counter
            start = clock()
            end = start + duration_s
            while True:
                t0 = clock()
                backend.run(inputs)
                t1 = clock()
                lat.append(t1 - t0)
                if t1 >= end:
                    break
            elapsed = clock() - start
            arr = np.asarray(lat) * 1000
            rows_out[str(rows)] = {
                "batch": rows, "calls": len(lat), "rows_per_s": round(len(lat) * rows / elapsed, 2),
                "p50_ms": round(float(np.percentile(arr, 50)), 4), "p99_ms": round(float(np.percentile(arr, 99)), 4),
                "mean_ms": round(float(arr.mean()), 4),
            }
        paced = _paced_p50_ms(backend, inputs_for(store, model, 1, seq, input_data)[0])
    finally:
        backend.close()
    best = max(rows_out.values(), key=lambda r: r["rows_per_s"])
    return {"model": model, "settings": settings, "by_batch": rows_out, "best_batch": best["batch"],
            "best_rows_per_s": best["rows_per_s"], "one_call_p50_ms": rows_out.get("1", best)["p50_ms"],
            "one_call_paced_p50_ms": paced, "pace_ms": PACE_S * 1000}


def _paced_p50_ms(backend: Any, inputs: dict[str, np.ndarray]) -> float:
    lat = []
    for _ in range(PACED_CALLS):
        time.sleep(PACE_S)
        t0 = time.perf_counter()
        backend.run(inputs)
        lat.append(time.perf_counter() - t0)
    return round(float(np.percentile(np.asarray(lat) * 1000, 50)), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", default="{}", help="JSON object of model settings (threads, graph_fusion...)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--input-data", help="FILE.npz|.json of real inputs (rows repeated to each batch size)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    result = measure(args.store, args.model, settings=json.loads(args.settings), batches=batches,
                     duration_s=args.duration_s, seq=args.seq, input_data=args.input_data)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for r in result["by_batch"].values():
            print(f"{args.model} batch {r['batch']:>4}: {r['rows_per_s']:>10.1f} rows/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
