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
MOVED_SHARE = 0.02  # RSS moved by more than this share of the limit (or of 256 MiB): read USS


@dataclass
class _Reading:
    rss_at_full: int = 0
    uss_at_full: int = 0
    full_at: float = 0.0


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
        live: set[int] = set()
        for model in models:
            if model.state != "ready":
                continue
            mem = model.memory
            uss = rss = vm = 0
            fully_read = False
            device_bytes: dict[str, int] = {}
            moved_by = MOVED_SHARE * (mem.limit_bytes or 256 * MiB)
            for runner in list(model.runners):
                pid = runner.pid
                if not pid or not runner.alive:
                    continue
                live.add(pid)
                seen = self._readings.setdefault(pid, _Reading())
                try:
                    fast = procfs.status(pid)
                    moved = abs(fast["rss"] - seen.rss_at_full) > moved_by
                    stale = mono - seen.full_at > QUIET_FULL_READ_S
                    if moved or stale or full_due or mem.sampled_at is None:
                        seen.uss_at_full = procfs.rollup(pid)["uss"]
                        seen.rss_at_full, seen.full_at = fast["rss"], mono
                        self.full_reads += 1
                        fully_read = True
                        active = active or moved
                        uss += seen.uss_at_full
                    else:
                        uss += max(0, seen.uss_at_full + fast["rss"] - seen.rss_at_full)
                    rss += fast["rss"]
                    vm += fast["vm"]
                except OSError:
                    continue
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
        for pid in [p for p in self._readings if p not in live]:
            del self._readings[pid]
        self._sample_own(models, mono)
        await self._shrink_idle_pools(models, now)
        device_used = {d: sum(m.memory.used_on(d) for m in models) + (self.own_bytes if d == "host" else 0) for d in gov.devices()}
        gov.device_used = device_used
        await gov.ladder.run(models, device_used, now)
        self._pace(active or gov.ladder.active(), mono)

    def _sample_own(self, models: list[Any], mono: float) -> None:
        """lastmile's own processes: the daemon and its forkserver (children that are not
        runners), as Anonymous pages (see the module docstring). The process list is asked
        again only after a load or unload, or every :data:`OWN_REFRESH_S`."""
        due = mono - self._own_at > OWN_REFRESH_S
        if self._own_dirty or due or not self._own_pids:
            runner_pids = {r.pid for m in models for r in m.runners if r.pid}
            try:
                import psutil

                me = psutil.Process()
                self._own_pids = [me.pid] + [c.pid for c in me.children() if c.pid not in runner_pids]
            except Exception:  # noqa: BLE001 - psutil missing or the process table unreadable
                self._own_pids = [os.getpid()]
            self._own_dirty = False
        changed = due
        rss_now: dict[int, int] = {}
        for pid in self._own_pids:
            try:
                rss_now[pid] = procfs.status(pid)["rss"]
            except OSError:
                continue
            if abs(rss_now[pid] - self._own_rss.get(pid, -MiB * 1024)) > MiB:
                changed = True
        if not changed and set(rss_now) == set(self._own_rss):
            return
        total = 0
        for pid in rss_now:
            try:
                total += procfs.rollup(pid)["anonymous"]
            except OSError:
                pass
        self._own_rss, self._own_at, self.own_bytes = rss_now, mono, total

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
