"""Gateway-ready metrics: with a generation model serving, /metrics carries vLLM's names
(``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``,
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``) with a
``model_name`` label beside Lastmile's own, read with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonProc, start_daemon

MODEL = "tiny"


@pytest.fixture(scope="module")
def served(tiny_lm: Path, demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    home = tmp_path_factory.mktemp("gateway-metrics")
    store = home / "store"
    shutil.copytree(demo_store, store)
    shutil.copytree(tiny_lm, store / MODEL)
    daemon = start_daemon(home / "d", store)
    try:
        status, body = asyncio.run(_call(daemon, "POST", f"/v2/repository/models/{MODEL}/load",
                                         {"parameters": {"engine": "deepspeed", "precision": "fp32", "max_num_seqs": 4}}))
        assert status == 200, body
        yield daemon
    finally:
        daemon.stop()


async def _call(daemon: DaemonProc, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
        async with s.request(method, "http://localhost" + path, json=body) as resp:
            return resp.status, await resp.read()


async def _stream(daemon: DaemonProc, max_tokens: int) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    chunks = 0
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
        async with s.post("http://localhost/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    json.loads(line[6:])
                    chunks += 1
    return chunks


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family: Any, sample_name: str, model: str) -> float:
    return next(s.value for s in family.samples if s.name == sample_name and s.labels.get("model_name") == model)


def test_vllm_names_beside_lastmiles_own(served: DaemonProc) -> None:
    assert asyncio.run(_stream(served, 12)) >= 2  # a first token and at least one gap after it
    status, raw = asyncio.run(_call(served, "GET", "/metrics"))
    assert status == 200
    families = _families(raw.decode())
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge", name
        value = _value(families[name], name, MODEL)
        assert value >= 0
    assert 0.0 <= _value(families["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc", MODEL) <= 1.0
    assert _value(families["vllm:num_requests_running"], "vllm:num_requests_running", MODEL) == 0  # the stream ended
    ttft = families["vllm:time_to_first_token_seconds"]
    itl = families["vllm:inter_token_latency_seconds"]
    assert ttft.type == "histogram" and itl.type == "histogram"
    assert _value(ttft, "vllm:time_to_first_token_seconds_count", MODEL) >= 1
    assert _value(itl, "vllm:inter_token_latency_seconds_count", MODEL) >= 1
    # the same observations as Lastmile's own histograms
    own = families["lastmile_generation_ttft_seconds"]
    own_count = next(s.value for s in own.samples if s.name.endswith("_count") and s.labels.get("model") == MODEL)
    assert own_count == _value(ttft, "vllm:time_to_first_token_seconds_count", MODEL)
    assert "lastmile_generation_running" in families and "lastmile_generation_kv_used_bytes" in families


def test_running_and_kv_while_streaming(served: DaemonProc) -> None:
    """Scrapes during four long streams: some scrape sees them running and KV in use."""

    async def go() -> list[tuple[float, float]]:
        streams = [asyncio.create_task(_stream(served, 96)) for _ in range(4)]
        seen = []
        while not all(t.done() for t in streams):
            _, raw = await _call(served, "GET", "/metrics")
            f = _families(raw.decode())
            seen.append((_value(f["vllm:num_requests_running"], "vllm:num_requests_running", MODEL),
                         _value(f["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc", MODEL)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*streams)
        return seen

    seen = asyncio.run(go())
    assert any(running >= 1 for running, _ in seen), seen
    assert any(0 < kv <= 1 for _, kv in seen), seen
