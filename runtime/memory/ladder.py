"""The mitigation ladder: what the governor does, one step per sampling round, to a model
over its high watermark (its own ``memory_limit_mb``, or the largest model of a device past
the device's watermark), and how it steps back down.

1. ``shrink``: idle pool buffers unlinked, runner asked to give caches back (ORT arena
   shrinkage, ``empty_cache``, ``malloc_trim``);
2. ``lower_batch``: the model's effective ``max_batch_size`` halved (repeatable down to 1);
3. ``shed``: new requests refused with 503 + ``Retry-After`` until usage is under
   ``low_watermark x limit``;
4. ``restart``: the runner is killed and restarted (back-off grows per restart).

Recovery: under the low watermark for :data:`RECOVER_AFTER_S`, shedding stops and the batch
size comes back (doubling per round) to the configured one (``memory_recovered`` events).
Every step is a ``memory_mitigation`` event with ``step``, ``used_bytes``, ``limit_bytes``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from lastmile.runtime.memory.errors import SHED_RETRY_AFTER_S, MemoryPressure
from lastmile.runtime.memory.units import human

if TYPE_CHECKING:
    from lastmile.runtime.memory.governor import MemoryGovernor

RECOVER_AFTER_S = 5.0
SHED_GRACE_S = 2.0  # shedding this long and still over: restart (step 4)
MEMORY_RESTART_BACKOFF_S = (0.0, 10.0, 30.0, 60.0, 300.0)


class Ladder:
    def __init__(self, governor: "MemoryGovernor") -> None:
        self.gov = governor
        self._restarts: set[asyncio.Task] = set()

    def active(self) -> bool:
        """Whether any model is on a step (the sampler keeps its fast pace meanwhile)."""
        return any(m.memory.ladder_step or m.memory.cap_hit_pending for m in self.gov.models())

    def _over(self, model: Any) -> tuple[bool, bool, int, int]:
        """(over the high watermark, under the low one, used, the limit that applies)."""
        mem = model.memory
        used = mem.used_on(mem.device)
        high, low = self.gov.config["high_watermark"], self.gov.config["low_watermark"]
        if mem.limit_bytes:
            return used > high * mem.limit_bytes, used < low * mem.limit_bytes, used, mem.limit_bytes
        return False, True, used, self.gov.budget(mem.device)["limit_bytes"]

    async def run(self, models: list[Any], device_used: dict[str, int], now: float) -> None:
        hot: dict[str, tuple[int, int, str]] = {}
        cool: set[str] = set()
        for model in models:
            if model.state != "ready" or model.memory.sampled_at is None:
                continue
            over, under, used, limit = self._over(model)
            if over:
                hot[model.name] = (used, limit, "model_limit")
            elif model.memory.cap_hit_pending:
                # The cap refused a batch: usage touched the limit between two samples.
                hot[model.name] = (max(used, limit), limit, "hard_cap")
            elif under:
                cool.add(model.name)
        for device, used in device_used.items():
            limit = self.gov.budget(device)["limit_bytes"]
            if limit and used > self.gov.config["high_watermark"] * limit:
                on_device = [m for m in models if m.state == "ready" and m.memory.device == device and m.name not in hot]
                if on_device:
                    biggest = max(on_device, key=lambda m: m.memory.used_on(device))
                    hot[biggest.name] = (used, limit, f"device_watermark:{device}")
                    cool.discard(biggest.name)
        by_name = {m.name: m for m in models}
        for name, (used, limit, why) in hot.items():
            await self._escalate(by_name[name], used, limit, why, now)
        for name in cool:
            self._recover(by_name[name], now)

    def _event(self, model: Any, step: str, message: str, used: int, limit: int, why: str, **extra: Any) -> None:
        self.gov.events.record("memory_mitigation", f"{model.name}: {message} (used {human(used)}, limit {human(limit)}, {why})",
                               model=model.name, level="warning", step=step, used_bytes=used, limit_bytes=limit, trigger=why,
                               uss_bytes=model.memory.uss_bytes, pool_bytes=model.memory.pool_bytes, **extra)

    @staticmethod
    async def shrink_runners(model: Any) -> None:
        """Ask every runner of ``model`` to give caches and stale segment mappings back (the
        runner pool's best-effort shrink: a busy or dead runner is skipped)."""
        await model.runners.shrink()

    async def _escalate(self, model: Any, used: int, limit: int, why: str, now: float) -> None:
        mem = model.memory
        mem.under_since = None
        # one step, then at least two samples to see its effect before the next one
        if now - mem.last_step_at < max(0.5, 2 * self.gov.config["sample_interval_s"]):
            return
        mem.last_step_at = now
        mem.cap_hit_pending = False
        configured = model.settings.max_batch_size
        effective = mem.effective_max_batch or configured
        if mem.ladder_step < 1:
            mem.ladder_step = 1
            freed = model.pool.shrink()
            await self.shrink_runners(model)
            self._event(model, "shrink", f"shrink pools and caches ({human(freed)} of idle pool buffers unlinked)",
                        used, limit, why, pool_freed_bytes=freed)
            return
        # Step 1 stays in force: segments the pool unlinked since are still mapped by the
        # runner (and count as its private memory) until it is told to drop them.
        await self.shrink_runners(model)
        if getattr(model, "generation", False):
            if self._fewer_slots(model, used, limit, why):
                return
        elif mem.ladder_step < 2 or (mem.ladder_step == 2 and effective > 1):
            mem.ladder_step = 2
            if effective > 1:
                new = max(1, effective // 2)
                mem.effective_max_batch = new
                if model.batcher:
                    model.batcher.configure(max_batch_size=new)
                self._event(model, "lower_batch", f"effective max_batch_size {effective} -> {new}", used, limit, why,
                            max_batch_size=new, configured_max_batch_size=configured)
                return
        if mem.ladder_step < 3:
            mem.ladder_step = 3
            mem.shedding = True
            mem.shed_since = now
            self._event(model, "shed", f"shedding new requests (503 + Retry-After) until under {self.gov.config['low_watermark']:.0%} of the limit",
                        used, limit, why)
            return
        stats = model.batcher.stats() if model.batcher else {}
        if stats.get("in_flight"):
            return  # let the batch in flight finish before the last resort
        if mem.shed_since is not None and now - mem.shed_since < SHED_GRACE_S:
            return  # shedding stops growth; give caches a moment to drain first
        if now < mem.next_restart_at:
            return
        mem.ladder_step = 4
        backoff = MEMORY_RESTART_BACKOFF_S[min(mem.memory_restarts + 1, len(MEMORY_RESTART_BACKOFF_S) - 1)]
        mem.memory_restarts += 1
        mem.next_restart_at = now + backoff
        self._event(model, "restart", f"restarting the runner (memory restart {mem.memory_restarts}; next one no sooner than {backoff:g} s)",
                    used, limit, why, memory_restarts=mem.memory_restarts)
        host = self.gov.host
        if host is not None:
            # its own task: a load can take minutes, and sampling (and the watchdog's
            # heartbeat) must go on meanwhile
            task = asyncio.get_running_loop().create_task(host.restart_for_memory(model))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def _fewer_slots(self, model: Any, used: int, limit: int, why: str) -> bool:
        """Step 2 for a generation model: halve the sequences it runs at once (its KV cache is
        what grows); the newest beyond the new limit are preempted, their KV freed now, and
        recomputed when a slot frees. False once at one slot: the next step follows."""
        mem = model.memory
        configured = int(model.info.get("max_num_seqs") or 1)
        effective = mem.effective_slots or configured
        if mem.ladder_step > 2 or effective <= 1:
            return False
        mem.ladder_step = 2
        new = max(1, effective // 2)
        mem.effective_slots = new
        model.runners.set_slots(new)
        self._event(model, "fewer_slots", f"max_num_seqs {effective} -> {new} (the newest sequences beyond it are preempted "
                    "and recomputed later)", used, limit, why, max_num_seqs=new, configured_max_num_seqs=configured)
        return True

    def note_cap_hit(self, model: Any) -> None:
        """The runner's hard cap refused a batch (its usage reached the limit between two
        samples): the next round treats the model as over its high watermark."""
        model.memory.cap_hits += 1
        model.memory.cap_hit_pending = True
        model.memory.under_since = None
        # A buffer lent for the failed batch (often the one the runner could not map) would
        # now sit idle outside the runner's cap, on top of a runner at its limit: unlink.
        model.pool.shrink()

    def _recover(self, model: Any, now: float) -> None:
        mem = model.memory
        if mem.ladder_step == 0:
            return
        if mem.under_since is None:
            mem.under_since = now
        if mem.shedding:
            mem.shedding = False
            mem.shed_since = None
            self.gov.events.record("memory_recovered", f"{model.name}: usage {human(mem.used_bytes)} is under the low watermark; "
                                   "accepting requests again", model=model.name, step="shed_end", used_bytes=mem.used_bytes,
                                   limit_bytes=mem.limit_bytes)
        if now - mem.under_since < RECOVER_AFTER_S:
            return
        if mem.effective_slots:
            configured_slots = int(model.info.get("max_num_seqs") or 1)
            new = min(configured_slots, mem.effective_slots * 2)
            mem.effective_slots = None if new == configured_slots else new
            model.runners.set_slots(mem.effective_slots)
            mem.under_since = now
            self.gov.events.record("memory_recovered", f"{model.name}: max_num_seqs back to {new}", model=model.name,
                                   step="raise_slots", max_num_seqs=new, used_bytes=mem.used_bytes)
            return
        configured = model.settings.max_batch_size
        if mem.effective_max_batch and mem.effective_max_batch < configured:
            new = min(configured, mem.effective_max_batch * 2)
            mem.effective_max_batch = None if new == configured else new
            if model.batcher:
                model.batcher.configure(max_batch_size=new)
            mem.under_since = now
            self.gov.events.record("memory_recovered", f"{model.name}: effective max_batch_size back to {new}", model=model.name,
                                   step="raise_batch", max_batch_size=new, used_bytes=mem.used_bytes)
            return
        mem.ladder_step = 0

    def check_request(self, model: Any, rows: int) -> None:
        """Refuse a request with 503 while the model sheds, or when it has more rows than the
        ladder's lowered batch size (it will fit again after recovery)."""
        mem = model.memory
        if mem.shedding:
            raise MemoryPressure(f"model {model.name!r} is over its memory high watermark and sheds load; retry later",
                                 SHED_RETRY_AFTER_S)
        if mem.effective_max_batch is not None and rows > mem.effective_max_batch and rows <= model.settings.max_batch_size:
            raise MemoryPressure(f"model {model.name!r} runs with max_batch_size {mem.effective_max_batch} under memory "
                                 f"pressure; this request has {rows} rows: retry later or split it", SHED_RETRY_AFTER_S)

    def close(self) -> None:
        for task in list(self._restarts):
            task.cancel()
