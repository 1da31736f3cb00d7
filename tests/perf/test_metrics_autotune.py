"""/metrics names and labels against a real daemon after real traffic (counts move, histograms
fill), and the auto-tuner against a real daemon with a tiny sweep: it chooses a setting, and
``--apply`` persists it (``GET /lm/v1/models/{name}``, the state file, and a daemon restart)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lastmile.appliance.client.autotune import Tuner, format_table
from lastmile.appliance.client.api import ApiError, LastmileClient
from lastmile.models.demo import example_inputs
from tests.conftest import ROOT, start_daemon


def scrape(client_socket: Path) -> dict[str, float]:
    out = subprocess.run(["curl", "-s", "--unix-socket", str(client_socket), "http://x/metrics"], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


async def test_metrics_names_labels_and_movement(daemon):
    async with LastmileClient(daemon.socket) as c:
        await c.load("demo-mlp", {"max_batch_size": 8, "max_delay_ms": 1.0})
        before = scrape(daemon.socket)
        x = example_inputs("mlp", 2)
        import asyncio

        await asyncio.gather(*(c.infer("demo-mlp", x, {"input": "FP32"}) for _ in range(12)))
        with pytest.raises(ApiError):
            await c.infer("demo-mlp", {"input": np.zeros((1, 3), np.float32)}, {"input": "FP32"})  # wrong shape: 400
        with pytest.raises(ApiError):
            await c.infer("demo-lm", example_inputs("lm", 1), {"input_ids": "INT64"})  # in the store, not loaded: 404
        with pytest.raises(ApiError):
            await c.infer("made-up-name", x, {"input": "FP32"})
    import time

    for _ in range(50):  # the memory governor samples every 0.5 s
        after = scrape(daemon.socket)
        if after.get('lastmile_model_memory_used_bytes{device="host",model="demo-mlp"}', 0) > 0:
            break
        time.sleep(0.2)
    m = 'model="demo-mlp"'
    key = lambda name, labels: f"{name}{{{labels}}}"  # noqa: E731
    ok = key("lastmile_requests_total", f'{m},outcome="success"')
    assert after[ok] - before.get(ok, 0) == 12
    assert after[key("lastmile_requests_total", f'{m},outcome="bad_request"')] >= 1
    assert after[key("lastmile_requests_total", 'model="demo-lm",outcome="not_found"')] >= 1
    assert after[key("lastmile_requests_total", 'model="_unknown",outcome="not_found"')] >= 1
    assert not any("made-up-name" in k for k in after)  # no label from a made-up name
    for hist in ("lastmile_request_duration_seconds", "lastmile_queue_time_seconds", "lastmile_batch_compute_seconds", "lastmile_batch_size"):
        count = after[key(f"{hist}_count", m)] - before.get(key(f"{hist}_count", m), 0)
        assert count >= 1, hist
        assert after[key(f"{hist}_bucket", f'le="+Inf",{m}')] == after[key(f"{hist}_count", m)]
    batches = after[key("lastmile_batch_size_count", m)] - before.get(key("lastmile_batch_size_count", m), 0)
    rows = after[key("lastmile_batch_size_sum", m)] - before.get(key("lastmile_batch_size_sum", m), 0)
    assert rows == 24 and 1 <= batches <= 12  # 12 requests of 2 rows, in one batch each at most
    assert after[key("lastmile_queue_depth", m)] == 0
    assert after[key("lastmile_model_ready", m)] == 1
    assert key("lastmile_runner_restarts_total", m) in after
    assert after[key("lastmile_model_memory_used_bytes", f'device="host",{m}')] > 1_000_000
    assert after['lastmile_memory_limit_bytes{device="host"}'] > 0
    assert after['lastmile_events_total{kind="loaded",level="info"}'] >= 1
    names = {re.sub(r"\{.*", "", k) for k in after}
    for name in names:
        assert name.startswith("lastmile_"), name
        assert re.fullmatch(r"[a-z_]+", name), name


async def test_autotune_tiny_sweep_applies_and_persists(store_copy: Path, tmp_path: Path):
    home = tmp_path / "home"
    d = start_daemon(home, store_copy)
    try:
        events: list[dict] = []
        async with LastmileClient(d.socket) as c:
            await c.load("demo-mlp", {"max_batch_size": 2, "max_delay_ms": 0.0})
            tuner = Tuner(c, "demo-mlp", latency_slo_ms=10_000, clients=4, duration_s=0.3, warmup_s=0.05,
                          grid={"max_batch_size": [1, 4], "max_delay_ms": [0.0, 0.5], "threads": [1]}, progress=events.append)
            result = await tuner.run(apply=True)
            assert len(result.trials) == 5  # 2 x 2 batching + 1 threads reload (threads 0 -> 1)
            assert all(t.rows_per_s > 0 and t.errors == 0 for t in result.trials)
            assert result.best is not None and result.applied
            assert result.best is max(result.trials, key=lambda t: t.rows_per_s)
            assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
            assert sum(e["event"] == "trial" for e in events) == 5
            assert "applied and saved" in format_table(result)
            chosen = {k: result.best.settings[k] for k in ("max_batch_size", "max_delay_ms", "threads")}
            got = (await c.model("demo-mlp"))["settings"]
            assert {k: got[k] for k in chosen} == chosen
            # an impossible SLO: nothing chosen, nothing applied, the settings put back
            strict = Tuner(c, "demo-mlp", latency_slo_ms=0.0001, clients=2, duration_s=0.2, warmup_s=0.05,
                           grid={"max_batch_size": [3], "max_delay_ms": [0.0]})
            none = await strict.run(apply=True)
            assert none.best is None and not none.applied
            assert (await c.model("demo-mlp"))["settings"]["max_batch_size"] == chosen["max_batch_size"]
            with pytest.raises(ValueError, match="grid: unknown setting"):
                Tuner(c, "demo-mlp", grid={"dtype": ["bf16"]})
        state = json.loads((home / "state.json").read_text())
        saved = json.dumps(state)
        assert f'"max_batch_size": {chosen["max_batch_size"]}' in saved
    finally:
        d.stop()
    d2 = start_daemon(home, store_copy)  # the state file brings the tuned settings back
    try:
        async with LastmileClient(d2.socket) as c:
            for _ in range(300):
                try:
                    got = (await c.model("demo-mlp"))
                    if got["state"] == "ready":
                        break
                except ApiError:
                    pass
                import asyncio

                await asyncio.sleep(0.1)
            assert {k: got["settings"][k] for k in chosen} == chosen
    finally:
        d2.stop()


def test_tune_cli_errors_are_one_line(daemon):
    out = subprocess.run([sys.executable, "-m", "lastmile.appliance.client.cli", "--socket", str(daemon.socket), "tune", "not-loaded"],
                         cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and out.stderr.startswith("lastmile: ") and "not-loaded" in out.stderr
