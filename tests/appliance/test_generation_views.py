"""What runs is what is shown, and generation is visible while it serves (issue 21, items 2
and 3): a real daemon serves the tiny causal LM on ORT-GenAI int4 (its CPU default) while the
settings say dtype fp32; every view (``/lm/v1/models`` and its detail, the monitor snapshot,
``/metrics``, the events, ``lastmile status`` and ``lastmile models``) shows what the runner
reported, and a generation model's row carries tokens/s, TTFT, inter-token p50/p99, running
and waiting sequences and KV cache used/reserved under fixed names."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from tests.conftest import ROOT, DaemonProc, start_daemon

MODEL = "tiny"
RUNS = {"engine": "ort-genai", "precision": "int4", "device": "cpu", "dtype": "int4"}
LIVE_FIELDS = {"engine", "precision", "running", "waiting", "kv_used_bytes", "kv_reserved_bytes", "tokens_per_s",
               "streams_per_s", "streams_active", "ttft_p50_ms", "ttft_p99_ms", "inter_token_p50_ms", "inter_token_p99_ms"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    from lastmile.runtime.generation.tiny import build_tiny_lm

    home = tmp_path_factory.mktemp("gen-views")
    store = home / "store"
    store.mkdir()
    build_tiny_lm(store / MODEL)
    daemon = start_daemon(home / "d", store)
    try:
        status, body = _call(daemon, "POST", f"/v2/repository/models/{MODEL}/load",
                             {"parameters": {"engine": "ort-genai", "precision": "int4", "max_num_seqs": 4}})
        assert status == 200, body
        yield daemon
    finally:
        daemon.stop()


def _call(daemon: DaemonProc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
            async with s.request(method, "http://localhost" + path, json=body) as resp:
                if resp.content_type == "application/json":
                    return resp.status, await resp.json()
                return resp.status, await resp.text()

    return asyncio.run(go())


def _generate(daemon: DaemonProc, tokens: int = 24) -> None:
    status, body = _call(daemon, "POST", "/v1/chat/completions",
                         {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": tokens,
                          "temperature": 0})
    assert status == 200, body


def _cli(daemon: DaemonProc, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(daemon.home)}
    return subprocess.run([sys.executable, "-m", "lastmile.appliance.client.cli", *args, "--socket", str(daemon.socket)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_every_view_shows_what_the_runner_reported(served: DaemonProc) -> None:
    status, data = _call(served, "GET", "/lm/v1/models")
    assert status == 200
    row = next(m for m in data["loaded"] if m["name"] == MODEL)
    assert row["runs"] == RUNS, row["runs"]
    assert row["runs_text"] == "ort-genai int4 on cpu"
    assert row["settings"]["dtype"] == "fp32"  # the requested setting is not what is shown as running
    status, detail = _call(served, "GET", f"/lm/v1/models/{MODEL}")
    assert detail["runs"] == RUNS and detail["generation"]["engine"] == "ort-genai" and detail["generation"]["precision"] == "int4"
    status, text = _call(served, "GET", "/metrics")
    assert 'lastmile_model_info{device="cpu",dtype="int4",engine="ort-genai",model="tiny",precision="int4"} 1.0' in text, text
    status, events = _call(served, "GET", "/lm/v1/events?since=0")
    started = [e["message"] for e in events["events"] if e["kind"] == "load_started" and e["model"] == MODEL]
    loaded = [e for e in events["events"] if e["kind"] == "loaded" and e["model"] == MODEL]
    assert started and all("deepspeed" not in m and "fp32" not in m for m in started), started
    assert "runs ort-genai int4 on cpu" in loaded[-1]["message"] and loaded[-1]["data"]["runs"] == RUNS
    out = _cli(served, "status")
    assert out.returncode == 0, out.stderr
    header = next(ln.split() for ln in out.stdout.splitlines() if ln.startswith("MODEL"))
    row = dict(zip(header, next(ln.split() for ln in out.stdout.splitlines() if ln.startswith(MODEL))))
    assert (row["ENGINE"], row["PRECISION"], row["DEVICE"]) == ("ort-genai", "int4", "cpu"), out.stdout
    assert "deepspeed" not in out.stdout and "fp32" not in out.stdout, out.stdout
    out = _cli(served, "models")
    header = next(ln.split() for ln in out.stdout.splitlines() if ln.startswith("MODEL"))
    row = dict(zip(header, next(ln.split() for ln in out.stdout.splitlines() if ln.startswith(MODEL))))
    assert (row["ENGINE"], row["PRECISION"]) == ("ort-genai", "int4") and "deepspeed" not in row.values(), out.stdout


def test_generation_rows_carry_live_figures(served: DaemonProc) -> None:
    async def snapshots_while_generating() -> list[dict[str, Any]]:
        rows = []
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(served.socket))) as s:
            async with s.ws_connect("http://localhost/lm/v1/monitor?rate_hz=10") as ws:
                await ws.receive_json()
                call = asyncio.create_task(asyncio.to_thread(_generate, served, 48))
                while not call.done() or len(rows) < 3:
                    snap = await ws.receive_json()
                    rows.append(next(r for r in snap["models"] if r["name"] == MODEL))
                await call
                for _ in range(3):  # right after: the rate covers the last seconds, it does not drop to 0 at once
                    snap = await ws.receive_json()
                    rows.append(next(r for r in snap["models"] if r["name"] == MODEL))
        return rows

    rows = asyncio.run(snapshots_while_generating())
    last = rows[-1]
    assert LIVE_FIELDS <= set(last["generation"]), set(last["generation"])
    assert last["runs"] == RUNS
    assert last["generation"]["tokens_per_s"] > 0
    assert last["rate_unit"] == "tokens/s" and last["rate_per_s"] > 0
    assert last["p50_of"] == "inter_token" and last["p50_ms"] is not None
    assert last["generation"]["ttft_p50_ms"] is not None and last["generation"]["inter_token_p99_ms"] is not None
    assert last["requests_per_s"] > 0  # streams started over the last seconds, not one tick's delta
    assert last["generation"]["kv_reserved_bytes"] > 0
    # the same names in /lm/v1/models, and `lastmile status` prints them
    status, data = _call(served, "GET", "/lm/v1/models")
    gen = next(m for m in data["loaded"] if m["name"] == MODEL)["generation"]
    assert LIVE_FIELDS <= set(gen) and gen["tokens_per_s"] > 0 and gen["ttft_p50_ms"] is not None
    out = _cli(served, "status")
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "TTFT p50" in out.stdout and "KV" in out.stdout, out.stdout


def test_tokens_per_s_is_a_rate_over_the_last_seconds() -> None:
    """100 tokens a second for 10 s read as ~100 tokens/s while they flow and for the window
    after, then 0: not one tick's delta that drops to zero between two chunks."""
    from lastmile.appliance.server.generation_metrics import RATE_WINDOW_S, _Rate

    rate = _Rate()
    t0 = 1000.0
    for i in range(1000):
        rate.add(t0 + i * 0.01, 1)
    end = t0 + 10.0
    assert 90 <= rate.per_s(end) <= 110
    assert 0 < rate.per_s(end + RATE_WINDOW_S / 2) < 100
    assert rate.per_s(end + RATE_WINDOW_S + 1) == 0.0
    young = _Rate()  # a stream younger than the window: divided by the time it has run
    for i in range(50):
        young.add(t0 + i * 0.01, 2)
    assert 150 <= young.per_s(t0 + 0.5) <= 250
