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
