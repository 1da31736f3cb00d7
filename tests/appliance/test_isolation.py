"""Runner isolation and backpressure through the real daemon: a runner killed with SIGKILL
mid-traffic fails only its in-flight requests, the daemon stays up and the model comes back;
a full queue answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lastmile.appliance.client.api import ApiError, LastmileClient
from tests.conftest import client_then_stop, start_daemon


async def _runner_pid(client: LastmileClient) -> int:
    return (await client.model("demo-mlp"))["runners"][0]["pid"]


@contextlib.contextmanager
def _runner_stopped(pid: int) -> Iterator[None]:
    """Keep the runner busy for as long as the block runs (batching no longer holds requests
    back on a clock, so a stopped runner is what keeps them queued)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def _until(done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _traffic(client: LastmileClient, stop: asyncio.Event, outcomes: list[str]) -> None:
    x = np.ones((2, 64), np.float32)
    while not stop.is_set():
        try:
            out, _ = await client.infer("demo-mlp", {"input": x}, {"input": "FP32"})
            assert out["logits"].shape == (2, 10)
            outcomes.append("ok")
        except ApiError as exc:
            outcomes.append(str(exc.status))
            await asyncio.sleep(0.01)


async def test_kill_9_runner_mid_traffic(demo_store: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", demo_store)
    async with client_then_stop(d) as client:
        await client.load("demo-mlp")
        await client.load("demo-mlp-ds")
        other_pid = (await client.model("demo-mlp-ds"))["runners"][0]["pid"]
        victim = (await client.model("demo-mlp"))["runners"][0]["pid"]
        stop, outcomes = asyncio.Event(), []
        workers = [asyncio.create_task(_traffic(client, stop, outcomes)) for _ in range(4)]
        await asyncio.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            model = await client.model("demo-mlp")
            if model["state"] == "ready" and model["runners"][0]["pid"] != victim:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)

        assert model["state"] == "ready" and model["restarts"] >= 1
        assert set(outcomes) <= {"ok", "503"}, set(outcomes)
        assert "503" in outcomes, "requests in flight or during the restart fail with 503"
        assert outcomes[-1] == "ok", "traffic flows again after the restart"
        # the other model never noticed
        other = await client.model("demo-mlp-ds")
        assert other["state"] == "ready" and other["runners"][0]["pid"] == other_pid and other["restarts"] == 0
        kinds = [e["kind"] for e in await client.events()]
        assert "runner_died" in kinds and "restarted" in kinds
        died = next(e for e in await client.events() if e["kind"] == "runner_died")
        assert "SIGKILL" in died["message"]
        assert d.proc.poll() is None, "the daemon stays up"


async def test_queue_full_is_503_with_retry_after(demo_store: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "q", demo_store)
    async with client_then_stop(d) as client:
        await client.load("demo-mlp", {"max_queue": 2, "max_batch_size": 64})
        x = np.ones((1, 64), np.float32)
        with _runner_stopped(await _runner_pid(client)):  # the first request holds the runner; two queue
            tasks = [asyncio.create_task(client._raw("POST", "/v2/models/demo-mlp/infer", json_body={
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.reshape(-1).tolist()}]})) for _ in range(6)]
            await _until(lambda: sum(t.done() for t in tasks) >= 3)
        results = await asyncio.gather(*tasks)
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) == 3 and statuses.count(503) == 3, statuses  # one at the runner, two queued
    rejected = next(r for r in results if r[0] == 503)
    assert int(rejected[1]["Retry-After"]) >= 1
    assert b"queue full" in rejected[2]


async def test_concurrent_request_limit_and_huge_headers(demo_store: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "c", demo_store, server_extra="max_concurrent_requests = 2")
    async with client_then_stop(d) as client:
        await client.load("demo-mlp", {"max_batch_size": 64})
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
        with _runner_stopped(await _runner_pid(client)):  # the two admitted requests stay in flight
            tasks = [asyncio.create_task(client._raw("POST", "/v2/models/demo-mlp/infer", json_body=body)) for _ in range(5)]
            await _until(lambda: sum(t.done() for t in tasks) >= 3)
        results = await asyncio.gather(*tasks)
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 200, 503, 503, 503], statuses
        refused = next(r for r in results if r[0] == 503)
        assert b"max_concurrent_requests" in refused[2] and refused[1]["Retry-After"] == "1"
        status, _, _ = await client._raw("GET", "/lm/v1/status", headers={"X-Big": "x" * 20000})
        assert status in (400, 431)
        assert (await client.status())["ready"], "the daemon shrugs both off"
