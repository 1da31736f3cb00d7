"""The memory governor against a real daemon with the demo models: estimates vs measured
usage, admission (refusal with numbers and options, plan = "auto", LRU eviction), the
mitigation ladder under a load past the limit with the runner's hard cap, run-time budget
changes, the buffer pool, and unload giving memory back. Every answer is checked against the
OpenAPI document (``call`` from tests/appliance/test_api.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from lastmile.models.demo import example_inputs
from lastmile.runtime.memory.procfs import forkserver_pids, pss
from lastmile.runtime.memory import FootprintWatch, read_proc_memory
from tests.appliance.test_api import call
from tests.conftest import DaemonProc, start_daemon

MB = 1024 * 1024
DEFAULTS = {"host_limit_mb": 0, "plan": "refuse", "evict_idle": False, "pool_idle_s": 30.0, "high_watermark": 0.9, "low_watermark": 0.8}


@pytest.fixture(scope="module")
def daemon(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = start_daemon(tmp_path_factory.mktemp("memd"), demo_store, extra_config="[memory]\nsample_interval_s = 0.2\n")
    yield proc
    proc.stop()


async def api(daemon: DaemonProc, method: str, path: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    status, headers, payload = await call(daemon, method, path, body=body)
    return status, (json.loads(payload) if payload else None), headers


async def unload_all(daemon: DaemonProc) -> None:
    _, models, _ = await api(daemon, "GET", "/lm/v1/models")
    for m in models["loaded"]:
        await api(daemon, "POST", f"/v2/repository/models/{m['name']}/unload")
    await api(daemon, "PUT", "/lm/v1/memory", DEFAULTS)


async def sampled(daemon: DaemonProc, name: str, predicate=lambda m: True, timeout: float = 10.0) -> dict[str, Any]:
    """The model's row of GET /lm/v1/memory once it was sampled and ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        _, mem, _ = await api(daemon, "GET", "/lm/v1/memory")
        row = mem["models"].get(name)
        if row and row["sampled_at"] and predicate(row):
            return row
        assert time.monotonic() < deadline, f"{name}: no matching sample in {timeout} s: {row}"
        await asyncio.sleep(0.2)


async def events_since(daemon: DaemonProc, seq: int) -> list[dict[str, Any]]:
    _, body, _ = await api(daemon, "GET", f"/lm/v1/events?since={seq}")
    return body["events"]


async def last_seq(daemon: DaemonProc) -> int:
    _, body, _ = await api(daemon, "GET", "/lm/v1/events?since=0&limit=1")
    return body["events"][-1]["seq"] if body["events"] else 0


async def infer_binary(daemon: DaemonProc, name: str, inputs: dict[str, np.ndarray]) -> tuple[int, dict[str, str]]:
    from lastmile.appliance.client.api import LastmileClient
    from lastmile.appliance.client.api import ApiError as ClientApiError

    async with LastmileClient(daemon.socket) as client:
        try:
            await client.infer(name, inputs, {k: "INT64" if v.dtype == np.int64 else "FP32" for k, v in inputs.items()})
            return 200, {}
        except ClientApiError as exc:
            return exc.status, {}


# --- estimates -------------------------------------------------------------------------------


async def test_estimates_within_tolerance_of_measured_usage(daemon: DaemonProc) -> None:
    """Estimate vs the runner's measured private memory (USS, what unloading returns) plus its
    pool, after a few requests: within 35 % or 6 MB, for both backends and three formats."""
    await unload_all(daemon)
    for name in ("demo-mlp", "demo-lm", "demo-mlp-ds", "demo-lm-ds", "demo-mlp-ts"):
        status, body, _ = await api(daemon, "POST", f"/v2/repository/models/{name}/load")
        assert status == 200, body
        assert body["memory"]["estimate_bytes"] > 0
        kind = "lm" if "lm" in name else "mlp"
        for _ in range(3):
            assert (await infer_binary(daemon, name, example_inputs(kind, 4)))[0] == 200
    for name in ("demo-mlp", "demo-lm", "demo-mlp-ds", "demo-lm-ds", "demo-mlp-ts"):
        row = await sampled(daemon, name, lambda m: m["pool"]["bytes"] > 0 and m["uss_bytes"] > 0)  # a full reading
        used, est = row["used_bytes"], row["estimate_bytes"]
        pid = (await api(daemon, "GET", f"/lm/v1/models/{name}"))[1]["runners"][0]["pid"]
        measured = read_proc_memory(pid)["uss"] + row["pool"]["bytes"]
        assert abs(measured - used) < 4 * MB, (name, measured, used)  # the daemon reports what /proc says
        assert abs(used - est) <= max(0.35 * est, 6 * MB), f"{name}: estimate {est / MB:.1f} MB, used {used / MB:.1f} MB"
        assert row["estimate_error"] is not None
        parts = row["estimate"]["parts"]
        assert sum(parts.values()) == est
    # /lm/v1/models shows the same, beside the fusion actually applied
    _, models, _ = await api(daemon, "GET", "/lm/v1/models")
    by = {m["name"]: m for m in models["loaded"]}
    assert by["demo-mlp"]["fusion"] == {"requested": "basic", "applied": ["ORT_ENABLE_BASIC"], "notes": []}
    assert by["demo-mlp-ts"]["fusion"]["requested"] == "basic" and by["demo-mlp-ts"]["fusion"]["applied"] == []
    assert by["demo-lm-ds"]["memory"]["used_bytes"] > 0
    await unload_all(daemon)


# --- admission -------------------------------------------------------------------------------


async def test_refusal_with_numbers_and_options_then_auto_plan(daemon: DaemonProc) -> None:
    await unload_all(daemon)
    params = {"max_batch_size": 4096, "memory_limit_mb": 40}
    status, dry, _ = await api(daemon, "POST", "/lm/v1/memory/estimate", {"model": "demo-lm", "parameters": params})
    assert status == 200 and dry["fits"] is False
    assert dry["shortfall"]["reason"] == "model_limit"
    seq = await last_seq(daemon)
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm/load", {"parameters": params})
    assert status == 507, body
    mem = body["memory"]
    assert mem["needed_bytes"] > mem["limit_bytes"] == 40 * MB and mem["free_bytes"] == 40 * MB
    kinds = {o["option"]: o for o in mem["options"]}
    assert "smaller_batch" in kinds and kinds["smaller_batch"]["estimate_bytes"] <= 40 * MB
    assert kinds["smaller_batch"]["settings"]["max_batch_size"] < 4096
    assert "MiB" in body["error"] and "would fit" in body["error"]
    assert [e["kind"] for e in await events_since(daemon, seq)] == ["load_refused"]
    _, models, _ = await api(daemon, "GET", "/lm/v1/models")
    assert models["loaded"] == []  # nothing was started

    assert (await api(daemon, "PUT", "/lm/v1/memory", {"plan": "auto"}))[0] == 200
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm/load", {"parameters": params})
    assert status == 200, body
    taken = body["memory"]["plan_taken"]
    assert taken["option"] == "smaller_batch"
    assert body["settings"]["max_batch_size"] == taken["settings"]["max_batch_size"] < 4096
    assert body["memory"]["estimate_bytes"] <= 40 * MB
    assert "memory_plan" in [e["kind"] for e in await events_since(daemon, seq)]
    await unload_all(daemon)


async def test_evict_idle_unloads_the_least_recently_used(daemon: DaemonProc) -> None:
    await unload_all(daemon)
    for name in ("demo-mlp", "demo-mlp-ts"):
        assert (await api(daemon, "POST", f"/v2/repository/models/{name}/load"))[0] == 200
    assert (await infer_binary(daemon, "demo-mlp", example_inputs("mlp", 2)))[0] == 200
    await asyncio.sleep(0.05)
    assert (await infer_binary(daemon, "demo-mlp-ts", example_inputs("mlp", 2)))[0] == 200  # demo-mlp is now LRU
    await sampled(daemon, "demo-mlp-ts")
    _, mem, _ = await api(daemon, "GET", "/lm/v1/memory")
    _, dry, _ = await api(daemon, "POST", "/lm/v1/memory/estimate", {"model": "demo-lm", "parameters": {}})
    # a host budget with room for what is loaded but not for demo-lm as well
    limit_mb = (mem["devices"]["host"]["committed_bytes"] + dry["estimate"]["total_bytes"]) // MB - 2
    assert (await api(daemon, "PUT", "/lm/v1/memory", {"host_limit_mb": int(limit_mb)}))[0] == 200
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm/load")
    assert status == 507
    assert [o["evict"] for o in body["memory"]["options"] if o["option"] == "evict_idle"] == [["demo-mlp"]]
    seq = await last_seq(daemon)
    assert (await api(daemon, "PUT", "/lm/v1/memory", {"evict_idle": True}))[0] == 200
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm/load")
    assert status == 200, body
    assert body["memory"]["plan_taken"]["evict"] == ["demo-mlp"]
    _, models, _ = await api(daemon, "GET", "/lm/v1/models")
    assert sorted(m["name"] for m in models["loaded"]) == ["demo-lm", "demo-mlp-ts"]
    evictions = [e for e in await events_since(daemon, seq) if e["kind"] == "memory_evict"]
    assert [e["model"] for e in evictions] == ["demo-mlp"]
    await unload_all(daemon)


# --- run-time budgets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"host_limit_mb": -5}, "host_limit_mb"),
        ({"high_watermark": 1.5}, "high_watermark"),
        ({"low_watermark": 0.95}, "low_watermark"),  # not below high_watermark 0.9
        ({"plan": "yolo"}, "plan"),
        ({"evict_idle": "yes"}, "evict_idle"),
        ({"host_limit_mb": 100, "bogus": 1}, "bogus"),
    ],
)
async def test_put_memory_validates_and_changes_nothing_on_error(daemon: DaemonProc, body: dict, field: str) -> None:
    _, before, _ = await api(daemon, "GET", "/lm/v1/memory")
    status, err, _ = await api(daemon, "PUT", "/lm/v1/memory", body)
    assert status == 400 and err["field"] == field, err
    _, after, _ = await api(daemon, "GET", "/lm/v1/memory")
    assert after["config"] == before["config"]


async def test_put_memory_changes_budget(daemon: DaemonProc) -> None:
    status, body, _ = await api(daemon, "PUT", "/lm/v1/memory", {"host_limit_mb": 1234})
    assert status == 200
    assert body["devices"]["host"]["limit_bytes"] == 1234 * MB and body["devices"]["host"]["source"] == "host_limit_mb"
    await api(daemon, "PUT", "/lm/v1/memory", DEFAULTS)


# --- buffer pool ------------------------------------------------------------------------------


async def test_pool_reused_after_warm_up_and_shrinks_when_idle(daemon: DaemonProc) -> None:
    await unload_all(daemon)
    assert (await api(daemon, "POST", "/v2/repository/models/demo-mlp/load"))[0] == 200
    for _ in range(40):
        assert (await infer_binary(daemon, "demo-mlp", example_inputs("mlp", 8)))[0] == 200
    row = await sampled(daemon, "demo-mlp")
    pool = row["pool"]
    assert pool["hit_rate"] >= 0.95 and pool["misses"] <= 4, pool
    segments = pool["segments"]
    for _ in range(20):
        assert (await infer_binary(daemon, "demo-mlp", example_inputs("mlp", 8)))[0] == 200
    row = await sampled(daemon, "demo-mlp")
    assert row["pool"]["segments"] == segments  # no growth over many batches
    assert row["pool"]["bytes_idle"] > 0
    seq = await last_seq(daemon)
    await api(daemon, "PUT", "/lm/v1/memory", {"pool_idle_s": 0.5})
    row = await sampled(daemon, "demo-mlp", lambda m: m["pool"]["bytes"] == 0)
    shrunk = [e for e in await events_since(daemon, seq) if e["kind"] == "pool_shrunk"]
    assert shrunk and shrunk[0]["data"]["freed_bytes"] > 0, (row, await events_since(daemon, seq))
    await unload_all(daemon)


# --- enforcement ------------------------------------------------------------------------------


LADDER = ["shrink", "lower_batch", "shed", "restart"]


def ladder_steps(events: list[dict[str, Any]], model: str) -> list[str]:
    return [e["data"]["step"] for e in events if e["kind"] == "memory_mitigation" and e["model"] == model]


def assert_in_ladder_order(steps: list[str]) -> None:
    """Steps first appear in ladder order and none is skipped (a step may repeat: lower_batch
    halves again, and after a recovery the batch size can be lowered anew)."""
    firsts = list(dict.fromkeys(steps))
    assert firsts == LADDER[:len(firsts)], steps


async def test_over_limit_load_peak_stays_within_5_percent_and_ladder_runs(daemon: DaemonProc) -> None:
    """demo-lm with memory_limit_mb 60 under concurrent 128-row x 64-token requests: one such
    batch needs ~61 MB past "ready" (activations + an 8 MB output in a 16 MB pool segment),
    two merged need twice that. The runner's cap refuses what would cross the limit (that
    batch fails alone, 503), each refusal drives the ladder (shrink, then lower_batch...), the
    model's footprint never passes the limit by more than 5 %, the daemon lives and the model
    serves again afterwards."""
    await unload_all(daemon)
    limit = 60 * MB
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm/load",
                                {"parameters": {"memory_limit_mb": 60, "max_batch_size": 256, "max_delay_ms": 20}})
    assert status == 200, body
    cap = body["memory"]["hard_cap"]
    assert cap["kind"] == "rlimit_as" and cap["headroom_bytes"] > 0
    assert 0 < body["pool"]["max_bytes"] <= cap["headroom_bytes"]  # the sampler may lower it already
    pid, prefix = body["runners"][0]["pid"], body["pool"]["prefix"]
    seq = await last_seq(daemon)
    big = example_inputs("lm", 128, seq=64)
    statuses: list[int] = []
    with FootprintWatch(pid, prefix) as watch:
        started = time.monotonic()
        while time.monotonic() < started + 30:
            results = await asyncio.gather(*(infer_binary(daemon, "demo-lm", big) for _ in range(3)))
            statuses += [s for s, _ in results]
            events = await events_since(daemon, seq)
            if "lower_batch" in ladder_steps(events, "demo-lm") and time.monotonic() > started + 5:
                break
    events = await events_since(daemon, seq)
    steps = ladder_steps(events, "demo-lm")
    assert "lower_batch" in steps, [(e["kind"], e["message"]) for e in events]
    assert_in_ladder_order(steps)
    assert any(e["kind"] == "memory_cap_hit" for e in events)
    for e in events:
        if e["kind"] == "memory_mitigation":
            assert e["data"]["limit_bytes"] == limit and e["data"]["used_bytes"] > 0 and e["time"]
            assert e["data"]["trigger"] in ("model_limit", "hard_cap")
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    assert watch.samples >= 20
    peak = watch.peak
    assert 0 < peak["total_bytes"] <= 1.05 * limit, (
        f"peak {peak['total_bytes'] / MB:.1f} MB (private {peak['private_bytes'] / MB:.1f} + pool "
        f"{peak['pool_bytes'] / MB:.1f}) for a {limit / MB:.0f} MB limit")
    print(f"\npeak footprint {peak['total_bytes'] / MB:.1f} MB (private {peak['private_bytes'] / MB:.1f} + pool "
          f"{peak['pool_bytes'] / MB:.1f}) for a {limit / MB:.0f} MB limit, {watch.samples} samples, statuses "
          f"{ {s: statuses.count(s) for s in set(statuses)} }, steps {steps}")
    # the load really pressed against the limit: the sampled peak came near it, or (when every
    # batch was refused faster than the 20 ms watch samples) an allocation hit the cap
    hard_cap_hits = [e for e in events if e["kind"] == "memory_cap_hit" and e["data"].get("step") == "hard_cap"]
    assert peak["total_bytes"] > 0.8 * limit or hard_cap_hits, [(e["kind"], e["message"]) for e in events]
    assert daemon.proc.poll() is None
    _, model, _ = await api(daemon, "GET", "/lm/v1/models/demo-lm")
    assert model["runners"][0]["pid"] == pid and model["runners"][0]["alive"]  # the cap, not a kill, held the line
    assert model["memory"]["cap_hits"] >= 1
    status, _ = await infer_binary(daemon, "demo-lm", example_inputs("lm", 1, seq=8))
    assert status == 200, [(e["kind"], e["message"]) for e in await events_since(daemon, seq)]
    await unload_all(daemon)


async def test_ladder_runs_every_step_in_order_then_recovers(daemon: DaemonProc) -> None:
    """An operator tightens the watermarks below what the model holds even at rest: nothing
    the runner can give back is enough, so the ladder goes all the way: shrink, lower_batch
    (8 -> 4 -> 2 -> 1), shed (503 + Retry-After), restart (a fresh runner); with the
    watermarks back, shedding ends and the batch size comes back."""
    await unload_all(daemon)
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm/load",
                                {"parameters": {"memory_limit_mb": 60, "max_batch_size": 8}})
    assert status == 200, body
    old_pid = body["runners"][0]["pid"]
    assert (await infer_binary(daemon, "demo-lm", example_inputs("lm", 2, seq=8)))[0] == 200
    seq = await last_seq(daemon)
    assert (await api(daemon, "PUT", "/lm/v1/memory", {"high_watermark": 0.05, "low_watermark": 0.02}))[0] == 200
    shed_answer = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        steps = ladder_steps(await events_since(daemon, seq), "demo-lm")
        if "shed" in steps and shed_answer is None:
            shed_answer = await call(daemon, "POST", "/v2/models/demo-lm/infer", body={
                "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]})
        if "restart" in steps and any(e["kind"] == "restarted" for e in await events_since(daemon, seq)):
            break
        await asyncio.sleep(0.2)
    events = await events_since(daemon, seq)
    steps = ladder_steps(events, "demo-lm")
    assert steps[:6] == ["shrink", "lower_batch", "lower_batch", "lower_batch", "shed", "restart"], steps
    assert [e["data"].get("max_batch_size") for e in events if e["data"].get("step") == "lower_batch"][:3] == [4, 2, 1]
    assert shed_answer is not None and shed_answer[0] == 503 and "Retry-After" in shed_answer[1], shed_answer
    assert any(e["kind"] == "restarted" and e["data"].get("reason") == "memory" for e in events)
    _, model, _ = await api(daemon, "GET", "/lm/v1/models/demo-lm")
    assert model["runners"][0]["pid"] != old_pid and model["memory"]["memory_restarts"] >= 1
    assert daemon.proc.poll() is None
    seq = await last_seq(daemon)
    await api(daemon, "PUT", "/lm/v1/memory", DEFAULTS)
    row = await sampled(daemon, "demo-lm", lambda m: not m["shedding"], timeout=10)
    assert row["state"] == "ready"
    assert any(e["kind"] == "memory_recovered" for e in await events_since(daemon, seq))
    assert (await infer_binary(daemon, "demo-lm", example_inputs("lm", 1, seq=8)))[0] == 200
    await unload_all(daemon)


# --- unload ----------------------------------------------------------------------------------


async def test_unload_gives_memory_back(daemon: DaemonProc) -> None:
    """lastmile's own processes (daemon + forkserver + runner): PSS after unload is back
    within a few MB of before the load."""
    await unload_all(daemon)
    await asyncio.sleep(1.0)  # runners of earlier tests are gone

    base = [daemon.proc.pid, *forkserver_pids(daemon.proc.pid)]

    def tree_pss(extra: tuple[int, ...] = ()) -> int:
        return pss([*base, *extra])

    before = tree_pss()
    status, body, _ = await api(daemon, "POST", "/v2/repository/models/demo-lm-ds/load")
    assert status == 200
    runner = (body["runners"][0]["pid"],)
    for _ in range(5):
        assert (await infer_binary(daemon, "demo-lm-ds", example_inputs("lm", 8, seq=32)))[0] == 200
    loaded = tree_pss(runner)
    await api(daemon, "POST", "/v2/repository/models/demo-lm-ds/unload")
    await asyncio.sleep(0.3)
    after = tree_pss(runner)  # the runner is gone: nothing of it is left to count
    assert loaded - before > 20 * MB
    assert after - before < max(0.05 * before, 8 * MB), (before / MB, loaded / MB, after / MB)
