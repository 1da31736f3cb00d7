"""Runner supervision and the systemd watchdog, and the buffer pool's byte cap: no daemon,
the real :class:`MemoryGovernor` sampling loop, the real ``Watchdog``/``Heartbeat`` sending
real sd_notify datagrams to a real AF_UNIX socket, real shared-memory segments."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from lastmile.appliance.server.sdnotify import Heartbeat, Watchdog
from lastmile.runtime.events import EventLog
from lastmile.runtime.memory import MemoryGovernor
from lastmile.runtime.shm import BufferPool, PoolFull

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "systemd"))
from sdhelpers import make_receiver  # noqa: E402


def pings(receiver) -> list[float]:
    return [t for t, m in receiver.snapshot() if m.get("WATCHDOG") == "1"]


async def test_stalled_sampler_stops_watchdog_pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's wiring (appliance/server/server.py): the governor's sampling loop beats the
    heartbeat each round, the watchdog pings only while beats are fresh. A sampler stuck on
    a runner stops WATCHDOG=1; once it moves again, the pings come back."""
    receiver = make_receiver("path", tmp_path)
    receiver.start()
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    governor = MemoryGovernor({"sample_interval_s": 0.02}, EventLog())
    stuck = asyncio.Event()
    release = asyncio.Event()
    real = governor.sample_once

    async def sample_once() -> None:
        if stuck.is_set():
            await release.wait()  # e.g. a runner that never answers
        await real()

    governor.sample_once = sample_once  # type: ignore[method-assign]
    heart = governor.supervise(Heartbeat(max_age_s=0.15))
    dog = Watchdog.start(heart, interval_s=0.02)
    try:
        await asyncio.sleep(0.3)
        assert len(pings(receiver)) >= 5, receiver.snapshot()
        stuck.set()
        await asyncio.sleep(0.3)  # the beats stop; within max_age the pings do too
        stalled_at = time.monotonic()
        await asyncio.sleep(0.3)
        assert [t for t in pings(receiver) if t > stalled_at] == [], "kept pinging while the sampler was stuck"
        assert dog.withheld > 0
        stuck.clear()
        release.set()
        await asyncio.sleep(0.3)
        assert [t for t in pings(receiver) if t > stalled_at], "pings did not resume"
    finally:
        await dog.stop()
        governor.close()
        receiver.close()


async def test_failing_sampler_does_not_beat(monkeypatch: pytest.MonkeyPatch) -> None:
    governor = MemoryGovernor({"sample_interval_s": 0.01}, EventLog())

    async def broken() -> None:
        raise RuntimeError("cannot read /proc")

    governor.sample_once = broken  # type: ignore[method-assign]
    heart = governor.supervise(Heartbeat(max_age_s=0.05))
    await asyncio.sleep(0.2)
    assert not heart()  # rounds that fail are not progress
    governor.close()


def test_pool_byte_cap_unlinks_idle_then_refuses() -> None:
    pool = BufferPool(f"lastmile-{os.getpid()}-captest{time.monotonic_ns()}-")
    try:
        pool.max_bytes = 64 * 1024
        a = pool.acquire(32 * 1024)
        b = pool.acquire(16 * 1024)
        pool.release(b)  # idle: 16 KiB
        c = pool.acquire(32 * 1024)  # 32 + 16 idle + 32 > 64: the idle one is unlinked first
        stats = pool.stats()
        assert stats["bytes_in_use"] == 64 * 1024 and stats["bytes_idle"] == 0 and stats["unlinked"] == 1
        with pytest.raises(PoolFull, match="cap of 65536 bytes"):
            pool.acquire(1)  # even one page does not fit next to 64 KiB lent out
        pool.release(a)
        pool.release(c)
        assert pool.acquire(64 * 1024).size == 64 * 1024  # idle ones make room again
        assert pool.stats()["max_bytes"] == 64 * 1024
    finally:
        pool.close()
