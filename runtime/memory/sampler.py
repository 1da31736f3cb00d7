"""The sampler: what each runner and lastmile itself really use, read from ``/proc`` at a pace
that follows activity, then the ladder.

Pace. Under traffic (a request since the last round, readings moving, a ladder step in force)
a round runs every ``sample_interval_s`` (0.5 s); the first request after a quiet spell wakes
the sampler at once (:meth:`Sampler.poke`), so the ladder reacts as fast as ever. With nothing
happening for :data:`QUIET_AFTER_S` the pause doubles per round up to :data:`QUIET_INTERVAL_S`
(under the watchdog's 20 s heartbeat age).

Cost. ``/proc/<pid>/status`` (RSS, VmSize) is cheap and read for every runner each round;
``smaps_rollup`` (USS; 10-30 ms for a torch process: the kernel walks the page tables) only
when RSS moved, every :data:`ACTIVE_FULL_EVERY` round under traffic (copy-on-write turns shared
pages private without moving RSS), and every :data:`QUIET_FULL_READ_S` when quiet. Between
full reads a runner's USS is carried forward by its RSS change.

"Own" memory (daemon + forkserver) is their ``Anonymous`` pages: a page the forkserver shares
with runners is counted once, there, however many runners share it (their USS never counts
it), so the figure does not swing with the number of loaded models.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lastmile.runtime.memory import procfs
from lastmile.runtime.memory.estimate import budget_device
from lastmile.runtime.memory.units import MiB, human

if TYPE_CHECKING:
    from lastmile.runtime.memory.governor import MemoryGovernor

logger = logging.getLogger("lastmile.memory")

ACTIVE_FULL_EVERY = 4
QUIET_AFTER_S = 3.0
QUIET_INTERVAL_S = 5.0
QUIET_FULL_READ_S = 60.0
OWN_REFRESH_S = 60.0
OWN_MIN_GAP_S = 2.0  # own memory moves slowly: its page walk at most this often unless a process came or went
MOVED_SHARE = 0.02  # RSS moved by more than this share of the limit (or of 256 MiB): read USS


@dataclass
class _Reading:
    rss_at_full: int = 0
    uss_at_full: int = 0
    full_at: float = 0.0


def _uss_of(pids: list[int]) -> dict[int, int]:
    """USS of each live pid (a thread: page walks)."""
    out = {}
    for pid in pids:
        try:
            out[pid] = procfs.rollup(pid)["uss"]
        except OSError:
            pass
    return out


def _anonymous_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += procfs.rollup(pid)["anonymous"]
        except OSError:
            pass
    return total


class Sampler:
    def __init__(self, governor: "MemoryGovernor") -> None:
        self.gov = governor
        self.own_bytes = 0
        self.rounds = 0
        self.full_reads = 0
        self.interval_s = governor.config["sample_interval_s"]
        self.quiet = False
        self._readings: dict[int, _Reading] = {}
        self._own_pids: list[int] = []
        self._own_rss: dict[int, int] = {}
        self._own_at = 0.0
        self._own_dirty = True
        self._own_reading: asyncio.Future | None = None
        self._last_request = 0.0
        self._active_at = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # --- pace -------------------------------------------------------------------------------

    def poke(self) -> None:
        """Something happened (a request, a load): back to the fast pace now. Cheap enough
        for the request path: a flag test when already active."""
        if self.quiet:
            self.quiet = False
            self.interval_s = self.gov.config["sample_interval_s"]
            if self._wake is not None:
                self._wake.set()

    def models_changed(self) -> None:
        self._own_dirty = True
        self.poke()

    def _pace(self, active: bool, now_mono: float) -> None:
        base = self.gov.config["sample_interval_s"]
        if active:
            self._active_at = now_mono
            self.interval_s, self.quiet = base, False
        elif now_mono - self._active_at >= QUIET_AFTER_S:
            self.quiet = True
            self.interval_s = max(base, QUIET_INTERVAL_S)

    # --- loop -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="lastmile-memory-sampler")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.gov.sample_once()
                if self.gov.heart is not None:
                    self.gov.heart.beat()  # a round that failed does not count as progress
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the sampler must outlive any one bad reading
                logger.exception("memory sampling failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    # --- one round --------------------------------------------------------------------------

    async def sample(self) -> None:
        """Read every runner's memory (and lastmile's own), then run the ladder."""
        gov = self.gov
        models = gov.models()
        now, mono = time.time(), time.monotonic()
        self.rounds += 1
        active = gov.ladder.active()
        last_request = max((m.last_used for m in models), default=0.0)
        if last_request > self._last_request:
            self._last_request = last_request
            active = True
        full_due = (self.rounds % ACTIVE_FULL_EVERY == 1) if not self.quiet else False
        # 1. the cheap reading of every runner, and which ones need their pages walked
        fast: dict[int, dict[str, int]] = {}
        walk: list[int] = []
        for model in models:
            if model.state != "ready":
                continue
            moved_by = MOVED_SHARE * (model.memory.limit_bytes or 256 * MiB)
            for runner in list(model.runners):
                pid = runner.pid
                if not pid or not runner.alive:
                    continue
                try:
                    fast[pid] = procfs.status(pid)
                except OSError:
                    continue
                seen = self._readings.setdefault(pid, _Reading())
                moved = abs(fast[pid]["rss"] - seen.rss_at_full) > moved_by
                active = active or moved
                if moved or full_due or mono - seen.full_at > QUIET_FULL_READ_S or model.memory.sampled_at is None:
                    walk.append(pid)
        # 2. the page walks (10-30 ms each for a torch process) off the event loop, together
        walked = await asyncio.to_thread(_uss_of, walk) if walk else {}
        self.full_reads += len(walked)
        # 3. per model
        for model in models:
            if model.state != "ready":
                continue
            mem = model.memory
            uss = rss = vm = 0
            fully_read = False
            device_bytes: dict[str, int] = {}
            for runner in list(model.runners):
                pid = runner.pid
                if pid not in fast:
                    continue
                seen = self._readings[pid]
                if pid in walked:
                    seen.uss_at_full, seen.rss_at_full, seen.full_at = walked[pid], fast[pid]["rss"], mono
                    fully_read = True
                    uss += seen.uss_at_full
                else:
                    uss += max(0, seen.uss_at_full + fast[pid]["rss"] - seen.rss_at_full)
                rss += fast[pid]["rss"]
                vm += fast[pid]["vm"]
                if budget_device(mem.device) != "host":
                    try:
                        got = await runner.memory(timeout_s=1.0)
                        backend = got.get("backend") or {}
                        if "device_reserved" in backend:
                            device_bytes[mem.device] = device_bytes.get(mem.device, 0) + int(backend["device_reserved"])
                    except Exception:  # noqa: BLE001
                        pass
            headroom = mem.cap.get("headroom_bytes")
            if mem.limit_bytes and headroom and budget_device(mem.device) == "host":
                # Pool segments the runner has not mapped yet are outside its cap: the pool
                # may hold what the limit leaves beside the runner's private memory, no more.
                model.pool.max_bytes = max(0, min(int(headroom), mem.limit_bytes - uss))
            stats = model.pool.stats()
            mem.uss_bytes, mem.rss_bytes, mem.vm_bytes = uss, rss, vm
            mem.pool_bytes = stats["bytes_in_use"] + stats["bytes_idle"]
            mem.device_bytes = device_bytes
            mem.sampled_at = now
            mem.peak_bytes = max(mem.peak_bytes, mem.used_on(mem.device))
            if fully_read and mem.ready_bytes is None:
                mem.ready_bytes = mem.used_on(mem.device)
                gov.record_footprint(model)
        for pid in [p for p in self._readings if p not in fast]:
            del self._readings[pid]
        self._sample_own(models, mono)  # (its page walk runs in a thread, applied next round)
        await self._shrink_idle_pools(models, now)
        device_used = {d: sum(m.memory.used_on(d) for m in models) + (self.own_bytes if d == "host" else 0) for d in gov.devices()}
        gov.device_used = device_used
        await gov.ladder.run(models, device_used, now)
        self._pace(active or gov.ladder.active(), mono)

    def _sample_own(self, models: list[Any], mono: float) -> None:
        """lastmile's own processes: the daemon and its forkserver (children that are not
        runners), as Anonymous pages (see the module docstring). The children come from
        ``/proc/self/task/*/children`` each round (the forkserver starts after the daemon);
        their pages are read again when one came or went, when an RSS moved by 1 MiB (at
        most every :data:`OWN_MIN_GAP_S`), or every :data:`OWN_REFRESH_S`."""
        due = mono - self._own_at > OWN_REFRESH_S
        runner_pids = {r.pid for m in models for r in m.runners if r.pid}
        try:
            kids = procfs.children()
        except OSError:  # no /proc/<pid>/task/*/children: ask psutil, after loads and unloads only
            kids = None
        if kids is not None:
            self._own_pids = [os.getpid()] + [pid for pid in kids if pid not in runner_pids]
        elif self._own_dirty or due or not self._own_pids:
            try:
                import psutil

                self._own_pids = [os.getpid()] + [c.pid for c in psutil.Process().children() if c.pid not in runner_pids]
            except Exception:  # noqa: BLE001 - psutil missing or the process table unreadable
                self._own_pids = [os.getpid()]
        self._own_dirty = False
        rss_now: dict[int, int] = {}
        for pid in self._own_pids:
            try:
                rss_now[pid] = procfs.status(pid)["rss"]
            except OSError:
                continue
        moved = any(abs(rss - self._own_rss.get(pid, rss)) > MiB for pid, rss in rss_now.items())
        if self._own_reading is not None:
            if not self._own_reading.done():
                return
            try:
                self.own_bytes = self._own_reading.result()
            except Exception:  # noqa: BLE001 - a failed walk keeps the last figure
                pass
            self._own_reading = None
        if set(rss_now) == set(self._own_rss) and not due and not (moved and mono - self._own_at > OWN_MIN_GAP_S):
            return
        # a page walk of the forkserver (torch loaded) costs ~30 ms: in a thread, not awaited;
        # its figure applies from the next round (own memory moves slowly)
        self._own_rss, self._own_at = rss_now, mono
        self._own_reading = asyncio.get_running_loop().run_in_executor(None, _anonymous_of, list(rss_now))

    async def _shrink_idle_pools(self, models: list[Any], now: float) -> None:
        """A model unused for ``pool_idle_s`` gives its idle pool buffers back (and its runners
        drop their mappings, or the pages would stay alive)."""
        for model in models:
            if model.state != "ready" or now - model.last_used < self.gov.config["pool_idle_s"]:
                continue
            if not model.pool.stats()["bytes_idle"]:
                continue
            stats = model.batcher.stats() if model.batcher else {}
            if stats.get("queue_depth") or stats.get("in_flight"):
                continue
            freed = model.pool.shrink()
            model.memory.pool_bytes = model.pool.stats()["bytes_in_use"]
            self.gov.events.record("pool_shrunk", f"{model.name}: idle for {now - model.last_used:.0f} s, "
                                   f"{human(freed)} of pool buffers given back", model=model.name, freed_bytes=freed)
            await self.gov.ladder.shrink_runners(model)
