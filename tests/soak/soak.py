"""The soak/load run: a real daemon, two models served on both backends, many concurrent
clients, a third model loaded and unloaded over and over during the traffic; then the numbers
that show nothing leaked.

Used by tests/soak/test_soak.py (short in the default run, long behind ``slow``) and by
``tests/soak/run_soak.py`` (a command that prints the report). What it measures:

* every answer: 200 with the right numbers (each request carries rows whose expected outputs
  are known, so a response that went to the wrong request would be caught), or a designed
  answer: 503 + Retry-After (a full queue: the steady models have small queues on purpose), or
  404 "not loaded" / 503 for the model being cycled while it is unloaded or loading;
* RSS of the daemon and of the steady models' runner processes, sampled through the run; the
  drift is the last sample minus the first sample taken after warm-up;
* file descriptors of the daemon (``/proc/<pid>/fd``) and of the runners, and shared-memory
  segments of the daemon's pool in /dev/shm, before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from lastmile.appliance.client.api import ApiError, LastmileClient
from lastmile.runtime.shm import count_segments
from tests.conftest import DaemonProc, start_daemon

STEADY = {"demo-mlp": {"max_batch_size": 16, "max_delay_ms": 2.0, "max_queue": 24}, "demo-mlp-ds": {"max_batch_size": 16, "max_delay_ms": 2.0, "max_queue": 24}}
CYCLED = "demo-lm"  # ONNX Runtime: loads in about a second, so it can come and go many times
MiB = 1024 * 1024


@dataclass
class SoakSettings:
    requests: int = 3000  # stop after this many requests ...
    seconds: float = 0.0  # ... or after this long, when > 0
    concurrency: int = 64
    warmup_fraction: float = 0.2  # RSS drift is measured from the end of warm-up
    cycle_pause_s: float = 0.5  # between an unload of the cycled model and its next load
    min_cycles: int = 2  # the traffic goes on until the cycled model came and went this often

    @classmethod
    def from_env(cls, **defaults: Any) -> "SoakSettings":
        s = cls(**defaults)
        s.requests = int(os.environ.get("LASTMILE_SOAK_REQUESTS", s.requests))
        s.seconds = float(os.environ.get("LASTMILE_SOAK_SECONDS", s.seconds))
        s.concurrency = int(os.environ.get("LASTMILE_SOAK_CONCURRENCY", s.concurrency))
        return s


@dataclass
class SoakReport:
    settings: dict[str, Any]
    duration_s: float = 0.0
    requests: int = 0
    ok: int = 0
    queue_full_503: int = 0
    cycled_unavailable: int = 0  # 404 not loaded / 503 loading, for the cycled model only
    errors: list[str] = field(default_factory=list)
    wrong_answers: int = 0
    loads: int = 0
    unloads: int = 0
    throughput_rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    daemon_rss_mib: list[float] = field(default_factory=list)  # samples after warm-up
    runner_rss_mib: list[float] = field(default_factory=list)  # sum over the steady runners
    daemon_rss_drift_mib: float = 0.0
    runner_rss_drift_mib: float = 0.0
    daemon_fds: dict[str, int] = field(default_factory=dict)
    runner_fds: dict[str, int] = field(default_factory=dict)
    shm_segments: dict[str, int] = field(default_factory=dict)
    daemon_alive: bool = True

    def summary(self) -> str:
        return (
            f"{self.requests} requests in {self.duration_s:.1f} s ({self.throughput_rps:.0f}/s) at concurrency "
            f"{self.settings['concurrency']}: {self.ok} ok, {self.queue_full_503} designed 503 (queue full), "
            f"{self.cycled_unavailable} cycled-model 404/503, {len(self.errors)} errors, {self.wrong_answers} wrong answers; "
            f"{self.loads} loads / {self.unloads} unloads of {CYCLED}; latency p50 {self.latency_ms.get('p50')} ms "
            f"p99 {self.latency_ms.get('p99')} ms; RSS drift after warm-up: daemon {self.daemon_rss_drift_mib:+.1f} MiB "
            f"(of {self.daemon_rss_mib[0] if self.daemon_rss_mib else 0:.0f}), runners {self.runner_rss_drift_mib:+.1f} MiB "
            f"(of {self.runner_rss_mib[0] if self.runner_rss_mib else 0:.0f}); daemon fds {self.daemon_fds}; "
            f"runner fds {self.runner_fds}; shm segments {self.shm_segments}"
        )


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pids: list[int]) -> float:
    return sum(psutil.Process(p).memory_info().rss for p in pids) / MiB


def _references() -> list[tuple[np.ndarray, np.ndarray]]:
    """A few inputs with the outputs the demo MLP must give for them (plain torch)."""
    import torch

    from lastmile.models.demo import reference_module

    module = reference_module("mlp")
    rng = np.random.default_rng(7)
    out = []
    for _ in range(16):
        x = rng.standard_normal((1, 64)).astype(np.float32)
        with torch.no_grad():
            out.append((x, module(torch.from_numpy(x)).numpy()))
    return out


async def _runner_pids(client: LastmileClient, names: list[str]) -> list[int]:
    pids = []
    for name in names:
        pids += [r["pid"] for r in (await client.model(name))["runners"] if r.get("pid")]
    return pids


async def _settle(check: Any, want: Any, timeout: float = 10.0) -> Any:
    """Poll ``check()`` until it equals ``want`` (connections close, pools shrink asynchronously)."""
    deadline = time.monotonic() + timeout
    value = check()
    while value != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = check()
    return value


async def run(daemon: DaemonProc, settings: SoakSettings) -> SoakReport:
    report = SoakReport(settings=asdict(settings))
    pid = daemon.proc.pid
    prefix = f"lastmile-{pid}-"
    refs = _references()
    lm_input = np.arange(8, dtype=np.int64).reshape(1, 8)

    # warm-up of the daemon itself: one load/unload opens whatever it opens once (forkserver)
    async with LastmileClient(daemon.socket) as admin:
        await admin.load(CYCLED)
        await admin.infer(CYCLED, {"input_ids": lm_input}, {"input_ids": "INT64"})
        await admin.unload(CYCLED)
    report.daemon_fds["idle"] = await _settle(lambda: fd_count(pid), fd_count(pid), 0.5)
    report.shm_segments["idle"] = count_segments(prefix)
    async with LastmileClient(daemon.socket) as admin:
        for name, params in STEADY.items():
            await admin.load(name, params)
        runners = await _runner_pids(admin, list(STEADY))
    report.daemon_fds["loaded"] = fd_count(pid)
    report.runner_fds["loaded"] = sum(fd_count(p) for p in runners)

    latencies: list[float] = []
    sent = 0
    started = time.monotonic()
    warm = asyncio.Event()
    done = asyncio.Event()
    cycled_loaded = False
    cycles_tried = 0  # load/unload cycles ended, well or with an error (reported)

    def keep_going() -> bool:
        # a fast box serves 3000 requests in about a second, less than one load/unload cycle:
        # the traffic lasts at least until the cycles it is meant to overlap have happened
        if cycles_tried < settings.min_cycles:
            return True
        if settings.seconds > 0:
            return time.monotonic() - started < settings.seconds
        return sent < settings.requests

    async def client_worker(client: LastmileClient, seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        while keep_going():
            sent += 1
            progress = (time.monotonic() - started) / settings.seconds if settings.seconds > 0 else sent / settings.requests
            if progress >= settings.warmup_fraction:
                warm.set()
            cycled = cycled_loaded and rng.random() < 0.1
            t0 = time.perf_counter()
            try:
                if cycled:
                    outputs, _ = await client.infer(CYCLED, {"input_ids": lm_input}, {"input_ids": "INT64"}, binary=rng.random() < 0.5)
                    if outputs["logits"].shape != (1, 8, 256):
                        report.wrong_answers += 1
                else:
                    name = rng.choice(list(STEADY))
                    rows = rng.sample(range(len(refs)), rng.randint(1, 3))
                    x = np.concatenate([refs[i][0] for i in rows])
                    want = np.concatenate([refs[i][1] for i in rows])
                    outputs, _ = await client.infer(name, {"input": x}, {"input": "FP32"}, binary=rng.random() < 0.7)
                    if not np.allclose(outputs["logits"], want, rtol=1e-4, atol=1e-5):
                        report.wrong_answers += 1
                report.ok += 1
                latencies.append((time.perf_counter() - t0) * 1000)
            except ApiError as exc:
                if exc.status == 503 and not cycled and "queue" in exc.message:
                    report.queue_full_503 += 1
                    await asyncio.sleep(0.005)
                elif cycled and (exc.status == 503 or (exc.status == 404 and "not loaded" in exc.message)):
                    report.cycled_unavailable += 1
                else:
                    report.errors.append(f"{exc.status} {exc.message}")
            except Exception as exc:  # noqa: BLE001 - anything else is an error to report
                report.errors.append(f"{type(exc).__name__}: {exc}")
            report.requests += 1
        done.set()

    async def cycler(client: LastmileClient) -> None:
        nonlocal cycled_loaded, cycles_tried
        while not done.is_set():
            try:
                await client.load(CYCLED)
                report.loads += 1
                cycled_loaded = True
                await asyncio.sleep(settings.cycle_pause_s)
                cycled_loaded = False
                await client.unload(CYCLED)
                report.unloads += 1
            except ApiError as exc:
                report.errors.append(f"cycle: {exc.status} {exc.message}")
            except Exception as exc:  # noqa: BLE001 - reported; the traffic must not wait on a dead cycler
                report.errors.append(f"cycle: {type(exc).__name__}: {exc}")
            cycles_tried += 1
            await asyncio.sleep(settings.cycle_pause_s)

    async def sampler(client: LastmileClient) -> None:
        await warm.wait()
        while not done.is_set():
            report.daemon_rss_mib.append(round(rss_mib([pid]), 2))
            report.runner_rss_mib.append(round(rss_mib(runners), 2))
            await asyncio.sleep(0.5)

    async with LastmileClient(daemon.socket) as client, LastmileClient(daemon.socket) as admin:
        tasks = [asyncio.create_task(client_worker(client, i)) for i in range(settings.concurrency)]
        side = [asyncio.create_task(cycler(admin)), asyncio.create_task(sampler(admin))]
        await asyncio.gather(*tasks)
        done.set()
        await asyncio.gather(*side)
        report.duration_s = round(time.monotonic() - started, 2)
        if CYCLED in {m["name"] for m in (await admin.models())["loaded"]}:
            await admin.unload(CYCLED)
            report.unloads += 1
        report.daemon_rss_mib.append(round(rss_mib([pid]), 2))
        report.runner_rss_mib.append(round(rss_mib(runners), 2))
        assert await _runner_pids(admin, list(STEADY)) == runners, "the steady runners never restarted"

    report.throughput_rps = round(report.requests / report.duration_s, 1)
    if latencies:
        q = statistics.quantiles(latencies, n=100)
        report.latency_ms = {"p50": round(q[49], 2), "p99": round(q[98], 2), "max": round(max(latencies), 2)}
    report.daemon_rss_drift_mib = round(report.daemon_rss_mib[-1] - report.daemon_rss_mib[0], 2)
    report.runner_rss_drift_mib = round(report.runner_rss_mib[-1] - report.runner_rss_mib[0], 2)

    # after the traffic, with the steady models still loaded and every client gone
    report.daemon_fds["after_traffic"] = await _settle(lambda: fd_count(pid), report.daemon_fds["loaded"])
    report.runner_fds["after_traffic"] = sum(fd_count(p) for p in runners)
    report.shm_segments["after_traffic"] = count_segments(prefix)
    async with LastmileClient(daemon.socket) as admin:
        for name in STEADY:
            await admin.unload(name)
    report.daemon_fds["unloaded"] = await _settle(lambda: fd_count(pid), report.daemon_fds["idle"])
    report.shm_segments["unloaded"] = await _settle(lambda: count_segments(prefix), report.shm_segments["idle"])
    report.daemon_alive = daemon.proc.poll() is None
    return report


def start(home: Path, store: Path) -> DaemonProc:
    # the steady models' small queues (max_queue 24) make designed 503s; the daemon-wide cap
    # stays above the concurrency so that those are the only 503s
    return start_daemon(home, store, server_extra="max_concurrent_requests = 4096\n")


def save(report: SoakReport, path: str | os.PathLike[str] | None) -> None:
    if path:
        Path(path).write_text(json.dumps(asdict(report), indent=2))
