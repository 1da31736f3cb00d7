"""The real benchmark against its targets (``pytest -m slow tests/perf``, minutes, on
an otherwise idle machine): at 64 clients Lastmile >= 85% of the in-process limit at the batch
size it formed and above the naive server and the peer; at 1 client <= 0.5 ms added p50 over
the Unix socket. Writes bench/results/last.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import Bench, table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_targets(demo_store: Path):
    bench = Bench(models=["demo-mlp", "demo-mlp-ds", "demo-lm", "demo-lm-ds"], clients=[1, 64], duration_s=5, warmup_s=1,
                  servers=["lastmile", "lastmile-json", "naive", "peer"], transport="unix", settings={}, store=demo_store,
                  open_rate=None, progress=print)
    try:
        result = bench.run()
    finally:
        bench.close()
    import json

    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "last.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    misses = []
    for model, e in result["models"].items():
        s = e["servers"]
        hi, lo = s["lastmile"]["64"], s["lastmile"]["1"]
        if (hi["vs_limit_same_batch"] or 0) < 0.85:
            misses.append(f"{model}: {hi['vs_limit_same_batch']:.2f} of the limit at batch {hi['avg_batch_size']}")
        for other in ("naive", "peer"):
            if hi["throughput_rps"] <= s[other]["64"]["throughput_rps"]:
                misses.append(f"{model}: below {other} at 64 clients")
        if lo["added_p50_ms"] > 0.5:
            misses.append(f"{model}: {lo['added_p50_ms']:.2f} ms added p50 at 1 client")
    assert not misses, "; ".join(misses)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_request_path_targets_on_the_compute_heavy_model(demo_store: Path, tmp_path: Path):
    """The request path's targets, default settings but max_batch_size: on bench-mlp-heavy
    (1024 -> 4096 -> 4096 -> 1024) binary >= 0.7 and JSON >= 0.6 of the in-process best at 64
    clients and <= 1.0 ms added p50 at 1 client; on demo-mlp (the model costs ~3 us a row, so
    the tree's CPU is the daemon's) <= 200 us daemon CPU per request binary, <= 300 us JSON.
    As measured in docs/performance.md the throughput ratios hold and the CPU and heavy-model
    latency figures do not yet; this test says by how much."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    bench = Bench(models=["bench-mlp-heavy", "demo-mlp"], clients=[1, 64], duration_s=3, warmup_s=0.5,
                  servers=["lastmile", "lastmile-json"], transport="unix", settings={"max_delay_ms": 2.0, "threads": 0},  # the defaults
                  store=store, open_rate=None, progress=print, repeat=3)
    try:
        result = bench.run()
    finally:
        bench.close()
    print(table(result))
    heavy, small = result["models"]["bench-mlp-heavy"]["servers"], result["models"]["demo-mlp"]["servers"]
    misses = [f"{what} {got} (target {op} {want})" for what, got, op, want in (
        ("heavy binary x limit @64", heavy["lastmile"]["64"]["vs_limit"], ">=", 0.7),
        ("heavy JSON x limit @64", heavy["lastmile-json"]["64"]["vs_limit"], ">=", 0.6),
        ("heavy added p50 ms @1", heavy["lastmile"]["1"]["added_p50_ms"], "<=", 1.0),
        ("demo-mlp daemon CPU us binary @64", small["lastmile"]["64"]["server_cpu_us"], "<=", 200),
        ("demo-mlp daemon CPU us JSON @64", small["lastmile-json"]["64"]["server_cpu_us"], "<=", 300),
    ) if not (got >= want if op == ">=" else got <= want)]
    assert not misses, "; ".join(misses)
