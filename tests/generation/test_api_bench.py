"""``python -m bench --generate`` end to end on the tiny LM, small: every server kind starts,
streams, and is measured with no errors; the ratios are computed in the same run. Slow (it
starts a daemon, a naive server and LitServe): ``pytest -m slow``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_generate_bench_runs_every_server() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--generate", "--concurrency", "1,2", "--requests", "2",
                          "--max-tokens", "4", "--long-prompt-tokens", "64", "--long-streams", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    servers = result["servers"]
    assert set(servers) == {"in-process deepspeed", "in-process ort-genai-int4", "lastmile deepspeed", "lastmile ort-genai-int4",
                            "naive", "peer"}
    for name, runs in servers.items():
        assert set(runs) == {"1", "2", "long"}, name
        for r in runs.values():
            assert r["errors"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0, (name, r)
            assert r["vs_in_process"] is not None and r["ttft_p50_ms"] is not None
