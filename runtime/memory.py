"""The memory-pool manager: budgets per device, admission of loads, accounting of what each
runner really uses, and the mitigation ladder when a model or a device runs hot.

Vocabulary (all bytes):

- *budget* of a device (``host``, ``cuda:0``...): ``[memory] host_limit_mb`` /
  ``device_limit_mb``, or a fraction of what the device has. Changeable at run time
  (:meth:`MemoryGovernor.configure`, ``PUT /lm/v1/memory``).
- *used* by a model: its runners' USS (private memory: what unloading gives back, read from
  ``/proc/<pid>/smaps_rollup``) plus its shared-memory pool (daemon-owned segments), and on an
  accelerator what the backend reports (torch's reserved bytes).
- *committed* by a model: ``max(estimate, used)``: a model that has not yet grown to its
  estimate keeps the room it was admitted with.
- *free* on a device: budget minus lastmile's own processes (daemon, forkserver) minus every
  model's committed bytes; on the host also never more than the OS says is available.

Ladder, per model, when ``used > high_watermark x limit`` (its ``memory_limit_mb``) or the
device's usage passes ``high_watermark x budget`` (then for the device's largest model): each
sampling tick that is still over goes one step further, every step an event
(``memory_mitigation`` with ``step``, ``used_bytes``, ``limit_bytes``...):

1. ``shrink``: idle pool buffers unlinked, runner asked to give caches back (ORT arena
   shrinkage, ``empty_cache``, ``malloc_trim``);
2. ``lower_batch``: the model's effective ``max_batch_size`` halved (repeatable down to 1);
3. ``shed``: new requests refused with 503 + ``Retry-After`` until usage is under
   ``low_watermark x limit``;
4. ``restart``: the runner is killed and restarted (back-off grows per restart).

Recovery: under the low watermark for :data:`RECOVER_AFTER_S`, shedding stops and the batch
size comes back (doubling per tick) to the configured one (``memory_recovered`` events).
The hard line at the limit itself is the runner's cap (:mod:`lastmile.runtime.memory_cap`), so a batch
that would go past it fails alone instead of the kernel OOM killer taking anything down.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.errors import LastmileRuntimeError, ModelUnavailable
from lastmile.runtime.estimate import MB, Estimate, budget_device, estimate
from lastmile.runtime.generation.config import is_generation_manifest
from lastmile.runtime.generation.memory import generation_estimate

if TYPE_CHECKING:
    from lastmile.runtime.events import EventLog
    from lastmile.runtime.manager import LoadedModel, ModelManager

logger = logging.getLogger("lastmile.memory")

RECOVER_AFTER_S = 5.0
SHED_RETRY_AFTER_S = 2.0
SHED_GRACE_S = 2.0  # shedding this long and still over: restart (step 4)
POOL_IDLE_SHARE = 0.25  # a model with a limit keeps at most this share of it as idle pool buffers
RESTART_BACKOFF_S = (0.0, 10.0, 30.0, 60.0, 300.0)
PLANS = ("refuse", "auto")

DEFAULTS: dict[str, Any] = {
    "host_limit_mb": 0,
    "host_limit_fraction": 0.8,
    "device_limit_mb": 0,
    "device_limit_fraction": 0.9,
    "high_watermark": 0.9,
    "low_watermark": 0.8,
    "plan": "refuse",
    "evict_idle": False,
    "sample_interval_s": 0.5,
    "pool_idle_s": 30.0,
}


class InsufficientMemory(LastmileRuntimeError):
    """A load does not fit (HTTP 507). ``detail`` holds the numbers and the options that would
    fit: ``{model, device, needed_bytes, free_bytes, limit_bytes, reason, estimate, options}``."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.detail = detail


class MemoryPressure(ModelUnavailable):
    """The model is shedding load (ladder step 3) or its runner's memory cap refused a batch:
    503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float = SHED_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- per-model accounting ----------------------------------------------------------------------


@dataclass
class ModelMemory:
    """What the governor knows about one loaded model (shown under ``memory`` in
    ``/lm/v1/models`` and ``/lm/v1/memory``)."""

    device: str = "host"  # the budget its main usage counts against
    estimate: Estimate | None = None
    limit_bytes: int | None = None
    uss_bytes: int = 0
    rss_bytes: int = 0
    vm_bytes: int = 0
    pool_bytes: int = 0
    device_bytes: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    sampled_at: float | None = None
    ladder_step: int = 0  # 0 none, 1 shrink, 2 lower_batch, 3 shed, 4 restart
    effective_max_batch: int | None = None
    shedding: bool = False
    under_since: float | None = None
    memory_restarts: int = 0
    next_restart_at: float = 0.0
    cap: dict[str, Any] = field(default_factory=dict)
    plan_taken: dict[str, Any] | None = None
    last_step_at: float = 0.0
    shed_since: float | None = None
    cap_hits: int = 0
    cap_hit_pending: bool = False  # a batch hit the runner's cap since the last ladder step
    _rss_at_uss: int = 0
    _ticks: int = 0

    @property
    def used_bytes(self) -> int:
        """Host usage: private memory of the runners plus the pool's segments."""
        return self.uss_bytes + self.pool_bytes

    def used_on(self, device: str) -> int:
        return self.used_bytes if device == "host" else self.device_bytes.get(device, 0)

    def committed_on(self, device: str) -> int:
        est = self.estimate.per_device.get(device, 0) if self.estimate else 0
        return max(est, self.used_on(device))

    def as_dict(self) -> dict[str, Any]:
        est = self.estimate.total_bytes if self.estimate else None
        used = self.used_bytes if self.device == "host" else self.used_on(self.device)
        return {
            "device": self.device,
            "used_bytes": used,
            "estimate_bytes": est,
            "estimate_error": (round((used - est) / est, 4) if est and self.sampled_at else None),
            "limit_bytes": self.limit_bytes,
            "uss_bytes": self.uss_bytes,
            "rss_bytes": self.rss_bytes,
            "vm_bytes": self.vm_bytes,
            "pool_bytes": self.pool_bytes,
            "device_bytes": dict(self.device_bytes),
            "peak_bytes": self.peak_bytes,
            "sampled_at": self.sampled_at,
            "ladder_step": ["none", "shrink", "lower_batch", "shed", "restart"][self.ladder_step],
            "effective_max_batch_size": self.effective_max_batch,
            "shedding": self.shedding,
            "memory_restarts": self.memory_restarts,
            "cap_hits": self.cap_hits,
            "hard_cap": self.cap or None,
            "plan_taken": self.plan_taken,
            "estimate": self.estimate.as_dict() if self.estimate else None,
        }


def read_proc_memory(pid: int, full: bool = True) -> dict[str, int]:
    """``rss``/``vm``/``hwm`` from ``/proc/<pid>/status`` (cheap), plus ``uss``/``swap`` from
    ``smaps_rollup`` when ``full`` (10-30 ms for a torch process: the kernel walks its page
    tables). Raises OSError when the process is gone."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmSize:", b"VmHWM:")):
                key, rest = line.split(b":", 1)
                out[{b"VmRSS": "rss", b"VmSize": "vm", b"VmHWM": "hwm"}[key]] = int(rest.split()[0]) * 1024
    if full:
        uss = swap = 0
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    uss += int(line.split()[1]) * 1024
                elif line.startswith(b"Swap:"):
                    swap = int(line.split()[1]) * 1024
        out["uss"], out["swap"] = uss, swap
    return out


def footprint(pid: int, pool_prefix: str, shm_dir: str = "/dev/shm") -> dict[str, int]:
    """What one model really occupies, each page counted once (tests and
    ``python -m lastmile.runtime.measure_memory``; too slow for the sampler: it reads the runner's whole
    ``/proc/<pid>/smaps``, 20-40 ms):

    - ``private_bytes``: the runner's private pages outside shared-memory segments
      (Private_Clean + Private_Dirty of every other mapping: heap, arenas, copied pages);
    - ``pool_bytes``: the model's pool segments: files in ``shm_dir`` named ``pool_prefix*``
      (allocated bytes, mapped or not, idle or lent) plus segments already unlinked that the
      runner still maps (their pages live until it drops the mapping);
    - ``total_bytes``: the sum, the figure held against ``memory_limit_mb``.

    USS + ``RssShmem`` (what a quick look gives) counts a pool page twice when only the runner
    maps it, and misses segments the runner has not mapped. Raises OSError when the process
    is gone."""
    private = 0
    stale: dict[str, int] = {}
    in_pool = False
    name = ""
    size = 0
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(b":"):  # a mapping's header: range perms offset dev inode [path]
                parts = line.split(None, 5)
                path = parts[5].strip().decode(errors="replace") if len(parts) > 5 else ""
                in_pool = path.startswith(f"{shm_dir}/") and "/lastmile-" in path
                name = path
                continue
            if in_pool:
                if head == b"Size:" and name.endswith(" (deleted)"):
                    size = int(line.split()[1]) * 1024
                    stale[name] = max(stale.get(name, 0), size)
            elif head in (b"Private_Clean:", b"Private_Dirty:"):
                private += int(line.split()[1]) * 1024
    pool = 0
    base = os.path.basename(pool_prefix)
    try:
        with os.scandir(shm_dir) as entries:
            for entry in entries:
                if entry.name.startswith(base):
                    try:
                        pool += entry.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    pool += sum(size for name, size in stale.items() if os.path.basename(name).startswith(base))
    return {"private_bytes": private, "pool_bytes": pool, "total_bytes": private + pool}


class FootprintWatch:
    """Samples :func:`lastmile.runtime.memory.footprint` of a runner from a thread: its private memory
    outside shared memory + the model's pool segments, each page once; keeps the peak."""

    def __init__(self, pid: int, prefix: str, interval_s: float = 0.02) -> None:
        self.pid, self.prefix, self.interval_s = pid, prefix, interval_s
        self.peak: dict[str, int] = {"total_bytes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = footprint(self.pid, self.prefix)
            except OSError:
                return
            self.samples += 1
            if now["total_bytes"] > self.peak["total_bytes"]:
                self.peak = now
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "FootprintWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- budgets -------------------------------------------------------------------------------


def accelerator_memory() -> dict[str, int]:
    """Total memory of each accelerator (``cuda:0`` -> bytes), asked only when device nodes
    exist (so a CPU-only daemon never imports torch for this)."""
    if not glob.glob("/dev/nvidia[0-9]*") and not glob.glob("/dev/davinci[0-9]*"):
        return {}
    try:
        from lastmile.runtime.accelerators import detect

        devices = detect()["accelerators"]["deepspeed"].get("devices", [])
        return {d["device"]: int(d["total_memory_bytes"]) for d in devices if d.get("total_memory_bytes")}
    except Exception as exc:  # noqa: BLE001 - no device budgets rather than no daemon
        logger.warning("could not read accelerator memory: %s", exc)
        return {}


def check_memory_config(values: dict[str, Any]) -> None:
    """Cross-key rules (each key's own range is checked by the caller's schema)."""
    if values["low_watermark"] >= values["high_watermark"]:
        raise ValueError(f"low_watermark: {values['low_watermark']} must be below high_watermark ({values['high_watermark']})")
    if values["plan"] not in PLANS:
        raise ValueError(f"plan: got {values['plan']!r}; allowed: {', '.join(PLANS)}")


class MemoryGovernor:
    """Budgets, admission, sampling and the ladder for one :class:`ModelManager`."""

    def __init__(self, config: dict[str, Any] | None, events: "EventLog", *, accelerators: dict[str, int] | None = None) -> None:
        self.config = {**DEFAULTS, **(config or {})}
        check_memory_config(self.config)
        self.events = events
        self.manager: ModelManager | None = None
        self._accelerators = accelerators
        self._task: asyncio.Task | None = None
        self._own_pids: set[int] = set()
        self._own_bytes = 0
        self._device_used: dict[str, int] = {}
        self._reserved: dict[str, Estimate] = {}  # loads in progress
        self.heart: Any = None  # anything with .beat(): the systemd watchdog's health check
        self._restarts: set[asyncio.Task] = set()

    # --- budgets ----------------------------------------------------------------------------

    @property
    def accelerators(self) -> dict[str, int]:
        if self._accelerators is None:
            self._accelerators = accelerator_memory()
        return self._accelerators

    def budget(self, device: str) -> dict[str, Any]:
        """``total_bytes`` (what the device has), ``limit_bytes`` and where it came from."""
        import psutil

        cfg = self.config
        if device == "host":
            total = int(psutil.virtual_memory().total)
            mb, fraction, key = cfg["host_limit_mb"], cfg["host_limit_fraction"], "host"
        else:
            total = self.accelerators.get(device, 0)
            mb, fraction, key = cfg["device_limit_mb"], cfg["device_limit_fraction"], "device"
        if mb:
            return {"total_bytes": total, "limit_bytes": mb * MB, "source": f"{key}_limit_mb"}
        return {"total_bytes": total, "limit_bytes": int(total * fraction), "source": f"{key}_limit_fraction"}

    def devices(self) -> list[str]:
        return ["host", *sorted(self.accelerators)]

    def _models(self) -> Iterable["LoadedModel"]:
        return list(self.manager.models.values()) if self.manager else []

    def committed(self, device: str, *, exclude: str | None = None) -> int:
        total = self._own_bytes if device == "host" else 0
        for m in self._models():
            if m.name != exclude:
                total += m.memory.committed_on(device)
        for name, est in self._reserved.items():
            if name != exclude and (self.manager is None or name not in self.manager.models):
                total += est.per_device.get(device, 0)
        return total

    def free(self, device: str, *, exclude: str | None = None) -> int:
        limit = self.budget(device)["limit_bytes"]
        free = limit - self.committed(device, exclude=exclude)
        if device == "host":
            import psutil

            # Room the OS has, minus what admitted models may still grow into.
            promised = sum(max(0, m.memory.committed_on("host") - m.memory.used_on("host"))
                           for m in self._models() if m.name != exclude)
            free = min(free, int(psutil.virtual_memory().available) - promised)
        return free

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply already type-checked ``changes`` (keys of ``[memory]``) after the cross-key
        rules; nothing changes when one is wrong (ValueError naming the key)."""
        unknown = [k for k in changes if k not in DEFAULTS]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown memory setting; known: {', '.join(DEFAULTS)}")
        new = {**self.config, **changes}
        check_memory_config(new)
        old = self.config
        self.config = new
        changed = {k: v for k, v in changes.items() if old.get(k) != v}
        if changed:
            self.events.record("memory_configured", f"memory settings changed: {changed}", changes=changed)
        if "sample_interval_s" in changed and self._task is not None:
            self.stop()
            self.start()
        return self.config

    # --- estimates and admission ------------------------------------------------------------

    def estimate(self, manifest: Manifest, settings: ModelSettings, backend: str) -> Estimate:
        device = self._device_of(settings)
        if is_generation_manifest(manifest):  # weights + slots x context x KV bytes per token
            return generation_estimate(manifest, settings, device)
        return estimate(manifest, settings, backend, device)

    def _device_of(self, settings: ModelSettings) -> str:
        if settings.device != "auto":
            return settings.device
        accel = [d for d in self.accelerators if d.startswith("cuda")]
        return accel[0] if accel else "cpu"

    def _shortfall(self, est: Estimate, limit_mb: int | None, exclude: str, evicted: Iterable[str] = ()) -> dict[str, Any] | None:
        """The first reason ``est`` does not fit (None when it fits)."""
        evicted = set(evicted)
        target = budget_device(est.device)
        if limit_mb is not None and est.per_device.get(target, 0) > limit_mb * MB:
            need = est.per_device.get(target, 0)
            return {"device": target, "reason": "model_limit", "needed_bytes": need, "free_bytes": limit_mb * MB,
                    "limit_bytes": limit_mb * MB}
        for device, need in est.per_device.items():
            if device != "host" and device not in self.accelerators:
                continue  # unknown device: the backend refuses it with its own words
            free = self.free(device, exclude=exclude) + sum(
                m.memory.committed_on(device) for m in self._models() if m.name in evicted)
            if need > free:
                return {"device": device, "reason": "device_budget", "needed_bytes": need, "free_bytes": max(0, free),
                        "limit_bytes": self.budget(device)["limit_bytes"]}
        return None

    def _idle_lru(self, exclude: str) -> list["LoadedModel"]:
        idle = []
        for m in self._models():
            stats = m.batcher.stats() if m.batcher else {}
            if m.name != exclude and m.state == "ready" and not stats.get("queue_depth") and not stats.get("in_flight"):
                idle.append(m)
        return sorted(idle, key=lambda m: m.last_used)

    def options(self, manifest: Manifest, settings: ModelSettings, backend: str) -> list[dict[str, Any]]:
        """Variants of the load that would fit now, best first: evicting idle models (nothing
        about the model changes), a smaller max batch, ZeRO offload (accelerators), lower
        precision. Each: ``{option, settings|evict, estimate_bytes, description}``."""
        name = manifest.name
        limit = settings.memory_limit_mb
        out: list[dict[str, Any]] = []
        est = self.estimate(manifest, settings, backend)
        victims: list[str] = []
        for m in self._idle_lru(name):
            victims.append(m.name)
            if self._shortfall(est, limit, name, victims) is None:
                out.append({"option": "evict_idle", "evict": list(victims), "settings": {},
                            "estimate_bytes": est.total_bytes,
                            "description": f"unload idle model(s) {', '.join(victims)} (least recently used first)"})
                break
        if is_generation_manifest(manifest):
            return out + self._generation_options(manifest, settings, backend, est)
        batch = settings.max_batch_size
        best = None
        low, high = 1, batch - 1
        while low <= high:
            mid = (low + high) // 2
            if self._shortfall(self.estimate(manifest, settings.overlay({"max_batch_size": mid}), backend), limit, name) is None:
                best, low = mid, mid + 1
            else:
                high = mid - 1
        if best:
            e = self.estimate(manifest, settings.overlay({"max_batch_size": best}), backend)
            out.append({"option": "smaller_batch", "settings": {"max_batch_size": best}, "estimate_bytes": e.total_bytes,
                        "description": f"max_batch_size {best} instead of {batch}"})
        device = budget_device(est.device)
        if device != "host" and backend == "deepspeed" and settings.offload != "cpu":
            e = self.estimate(manifest, settings.overlay({"offload": "cpu"}), backend)
            if self._shortfall(e, limit, name) is None:
                out.append({"option": "zero_offload", "settings": {"offload": "cpu"}, "estimate_bytes": e.total_bytes,
                            "description": "ZeRO-Inference: parameters offloaded to host memory"})
        if settings.dtype == "fp32":
            lower = "fp16" if backend == "onnxruntime" or device != "host" else "bf16"
            e = self.estimate(manifest, settings.overlay({"dtype": lower}), backend)
            if self._shortfall(e, limit, name) is None:
                out.append({"option": "lower_precision", "settings": {"dtype": lower}, "estimate_bytes": e.total_bytes,
                            "description": f"dtype {lower} instead of fp32 (half the weight memory)"})
            elif best is None:
                for size in (batch // 2, batch // 4, 1):
                    if size < 1:
                        continue
                    e = self.estimate(manifest, settings.overlay({"dtype": lower, "max_batch_size": size}), backend)
                    if self._shortfall(e, limit, name) is None:
                        out.append({"option": "lower_precision_smaller_batch",
                                    "settings": {"dtype": lower, "max_batch_size": size}, "estimate_bytes": e.total_bytes,
                                    "description": f"dtype {lower} and max_batch_size {size}"})
                        break
        return out

    def _generation_options(self, manifest: Manifest, settings: ModelSettings, backend: str, est: Estimate) -> list[dict[str, Any]]:
        """The first variant of each kind (context, slots, precision) that fits, with what it frees."""
        from lastmile.runtime.generation.config import causal_lm_config
        from lastmile.runtime.generation.memory import generation_variants

        cfg = causal_lm_config(manifest.artifact) or {}
        out: list[dict[str, Any]] = []
        kinds: set[str] = set()
        for changes, description in generation_variants(settings, cfg.get("max_position_embeddings")):
            kind = "precision" if "precision" in changes else next(iter(changes))
            if kind in kinds:
                continue
            e = self.estimate(manifest, settings.overlay(changes), backend)
            if self._shortfall(e, settings.memory_limit_mb, manifest.name) is None:
                kinds.add(kind)
                freed = est.total_bytes - e.total_bytes
                out.append({"option": f"generation_{kind}", "settings": changes, "estimate_bytes": e.total_bytes,
                            "description": f"{description} frees {freed / MB:.0f} MiB"})
        return out

    def dry_run(self, manifest: Manifest, settings: ModelSettings, backend: str) -> dict[str, Any]:
        """What a load would need and whether it fits now, without starting anything."""
        est = self.estimate(manifest, settings, backend)
        short = self._shortfall(est, settings.memory_limit_mb, manifest.name)
        out = {
            "model": manifest.name,
            "fits": short is None,
            "estimate": est.as_dict(),
            "free_bytes": {d: max(0, self.free(d, exclude=manifest.name)) for d in est.per_device if d == "host" or d in self.accelerators},
            "plan": self.config["plan"],
            "evict_idle": self.config["evict_idle"],
        }
        if short is not None:
            out["shortfall"] = short
            out["options"] = self.options(manifest, settings, backend)
        return out

    async def admit(self, manifest: Manifest, settings: ModelSettings, backend: str) -> tuple[ModelSettings, Estimate, dict[str, Any] | None]:
        """Settings to load with (possibly changed by ``plan = "auto"``), the estimate, and the
        plan taken (None when the request fitted as asked). Evicts idle models when
        ``evict_idle`` is on and that makes room. Raises :class:`InsufficientMemory`."""
        name = manifest.name
        est = self.estimate(manifest, settings, backend)
        short = self._shortfall(est, settings.memory_limit_mb, name)
        if short is None:
            return settings, est, None
        options = self.options(manifest, settings, backend)
        chosen = None
        for option in options:
            if option["option"] == "evict_idle":
                if self.config["evict_idle"]:
                    chosen = option
                    break
            elif self.config["plan"] == "auto":
                chosen = option
                break
        if chosen is None:
            need, free = short["needed_bytes"], short["free_bytes"]
            what = "its memory_limit_mb" if short["reason"] == "model_limit" else f"the free {short['device']} budget"
            message = (f"model {name!r} needs an estimated {need / MB:.1f} MB on {short['device']}, more than {what} "
                       f"({free / MB:.1f} MB free, limit {short['limit_bytes'] / MB:.1f} MB)")
            if options:
                message += "; would fit: " + "; ".join(o["description"] for o in options)
            else:
                message += "; no smaller variant fits"
            if any(o["option"] != "evict_idle" for o in options) and self.config["plan"] != "auto":
                message += " (or set memory.plan = \"auto\")"
            if any(o["option"] == "evict_idle" for o in options) and not self.config["evict_idle"]:
                message += " (or set memory.evict_idle = true)"
            self.events.record("load_refused", message, model=name, level="warning", needed_bytes=need, free_bytes=free,
                               limit_bytes=short["limit_bytes"], device=short["device"], options=options)
            raise InsufficientMemory(message, {"model": name, **short, "estimate": est.as_dict(), "options": options})
        if chosen["option"] == "evict_idle":
            for victim in chosen["evict"]:
                self.events.record("memory_evict", f"unloading idle model {victim} to make room for {name}", model=victim,
                                   for_model=name, freed_bytes=self.manager.models[victim].memory.committed_on("host")
                                   if self.manager and victim in self.manager.models else None)
                if self.manager is not None:
                    await self.manager.unload(victim, reason=f"evicted (idle, least recently used) to make room for {name}")
            return settings, est, chosen
        new_settings = settings.overlay(chosen["settings"])
        new_est = self.estimate(manifest, new_settings, backend)
        self.events.record("memory_plan", f"{name} does not fit as asked; plan auto took: {chosen['description']}",
                           model=name, option=chosen["option"], settings=chosen["settings"], needed_bytes=est.total_bytes,
                           estimate_bytes=new_est.total_bytes, free_bytes=short["free_bytes"])
        return new_settings, new_est, chosen

    def reserve(self, name: str, est: Estimate) -> None:
        self._reserved[name] = est

    def release(self, name: str) -> None:
        self._reserved.pop(name, None)

    # --- sampling ---------------------------------------------------------------------------

    def supervise(self, heart: Any) -> Any:
        """Beat ``heart`` (``lastmile.appliance.server.sdnotify.Heartbeat``) after every sampling round and
        start sampling now (models or not), so the systemd watchdog stops pinging when runner
        supervision is stuck. Returns ``heart`` (the watchdog's health check)."""
        self.heart = heart
        self.start()
        return heart

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="lastmile-memory-sampler")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def close(self) -> None:
        """Stop sampling and any memory restart in progress (daemon shutdown)."""
        self.stop()
        for task in list(self._restarts):
            task.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample_once()
                if self.heart is not None:
                    self.heart.beat()  # a round that failed does not count as progress
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the sampler must outlive any one bad reading
                logger.exception("memory sampling failed")
            await asyncio.sleep(self.config["sample_interval_s"])

    def _sample_own(self) -> None:
        """lastmile's own processes: the daemon and its forkserver (children that are not runners)."""
        import psutil

        runner_pids = {r.pid for m in self._models() for r in m.runners if r.pid}
        total = 0
        try:
            me = psutil.Process()
            pids = [me.pid] + [c.pid for c in me.children() if c.pid not in runner_pids]
        except psutil.Error:
            pids = [os.getpid()]
        for pid in pids:
            try:
                total += read_proc_memory(pid)["uss"]
            except OSError:
                pass
        self._own_bytes = total

    async def sample_once(self) -> None:
        """Read every runner's memory, then run the ladder where needed."""
        mm = self._models()
        now = time.time()
        self._tick = getattr(self, "_tick", 0) + 1
        if self._tick % 10 == 1:
            self._sample_own()
        for model in mm:
            if model.state not in ("ready",):
                continue
            mem = model.memory
            uss = rss = vm = 0
            device_bytes: dict[str, int] = {}
            mem._ticks += 1
            for runner in list(model.runners):
                if not runner.pid or not runner.alive:
                    continue
                try:
                    fast = read_proc_memory(runner.pid, full=False)
                    # smaps_rollup costs 10-30 ms: every 4th tick, or when RSS moved by >2% of the limit.
                    moved = abs(fast["rss"] - mem._rss_at_uss) > 0.02 * (mem.limit_bytes or 256 * MB)
                    if mem._ticks % 4 == 1 or moved or mem.sampled_at is None:
                        full = read_proc_memory(runner.pid, full=True)
                        uss += full["uss"]
                        mem._rss_at_uss = full["rss"]
                    else:
                        uss += max(0, mem.uss_bytes + fast["rss"] - mem._rss_at_uss) if len(model.runners) == 1 else mem.uss_bytes
                    rss += fast["rss"]
                    vm += fast["vm"]
                except OSError:
                    continue
                if budget_device(model.memory.device) != "host":
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
        await self._shrink_idle_pools(mm, now)
        device_used = {d: sum(m.memory.used_on(d) for m in mm) + (self._own_bytes if d == "host" else 0) for d in self.devices()}
        self._device_used = device_used
        await self._ladder(mm, device_used, now)

    async def _shrink_idle_pools(self, models: list["LoadedModel"], now: float) -> None:
        """A model unused for ``pool_idle_s`` gives its idle pool buffers back (and its runners
        drop their mappings, or the pages would stay alive)."""
        for model in models:
            if model.state != "ready" or now - model.last_used < self.config["pool_idle_s"]:
                continue
            if not model.pool.stats()["bytes_idle"]:
                continue
            stats = model.batcher.stats() if model.batcher else {}
            if stats.get("queue_depth") or stats.get("in_flight"):
                continue
            freed = model.pool.shrink()
            model.memory.pool_bytes = model.pool.stats()["bytes_in_use"]
            self.events.record("pool_shrunk", f"{model.name}: idle for {now - model.last_used:.0f} s, "
                               f"{freed / MB:.1f} MB of pool buffers given back", model=model.name, freed_bytes=freed)
            for runner in list(model.runners):
                try:
                    await asyncio.wait_for(runner.shrink(), 5.0)
                except Exception:  # noqa: BLE001
                    pass

    # --- the ladder -------------------------------------------------------------------------

    def _over(self, model: "LoadedModel", device_used: dict[str, int]) -> tuple[bool, bool, int, int]:
        """(over the high watermark, under the low one, used, the limit that applies)."""
        mem = model.memory
        used = mem.used_on(mem.device)
        high, low = self.config["high_watermark"], self.config["low_watermark"]
        if mem.limit_bytes:
            return used > high * mem.limit_bytes, used < low * mem.limit_bytes, used, mem.limit_bytes
        budget = self.budget(mem.device)["limit_bytes"]
        return False, True, used, budget

    async def _ladder(self, models: list["LoadedModel"], device_used: dict[str, int], now: float) -> None:
        hot: dict[str, tuple[int, int, str]] = {}
        cool: set[str] = set()
        for model in models:
            if model.state != "ready":
                continue
            over, under, used, limit = self._over(model, device_used)
            if over:
                hot[model.name] = (used, limit, "model_limit")
            elif model.memory.cap_hit_pending:
                # The cap refused a batch: usage touched the limit between two samples.
                hot[model.name] = (max(used, limit), limit, "hard_cap")
            elif under:
                cool.add(model.name)
        for device, used in device_used.items():
            limit = self.budget(device)["limit_bytes"]
            if limit and used > self.config["high_watermark"] * limit:
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

    def _event(self, model: "LoadedModel", step: str, message: str, used: int, limit: int, why: str, **extra: Any) -> None:
        self.events.record("memory_mitigation", f"{model.name}: {message} (used {used / MB:.1f} MB, limit {limit / MB:.1f} MB, {why})",
                           model=model.name, level="warning", step=step, used_bytes=used, limit_bytes=limit, trigger=why,
                           uss_bytes=model.memory.uss_bytes, pool_bytes=model.memory.pool_bytes, **extra)

    async def _escalate(self, model: "LoadedModel", used: int, limit: int, why: str, now: float) -> None:
        mem = model.memory
        mem.under_since = None
        # one step, then at least two samples to see its effect before the next one
        if now - mem.last_step_at < max(0.5, 2 * self.config["sample_interval_s"]):
            return
        mem.last_step_at = now
        mem.cap_hit_pending = False
        configured = model.settings.max_batch_size
        effective = mem.effective_max_batch or configured
        if mem.ladder_step < 1:
            mem.ladder_step = 1
            freed = model.pool.shrink()
            for runner in list(model.runners):
                try:
                    await asyncio.wait_for(runner.shrink(), 5.0)
                except Exception:  # noqa: BLE001 - a busy or dead runner: the next step follows
                    pass
            self._event(model, "shrink", f"shrink pools and caches ({freed / MB:.1f} MB of idle pool buffers unlinked)",
                        used, limit, why, pool_freed_bytes=freed)
            return
        # Step 1 stays in force: segments the pool unlinked since are still mapped by the
        # runner (and count as its private memory) until it is told to drop them.
        for runner in list(model.runners):
            try:
                await asyncio.wait_for(runner.shrink(), 5.0)
            except Exception:  # noqa: BLE001
                pass
        if mem.ladder_step < 2 or (mem.ladder_step == 2 and effective > 1):
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
            self._event(model, "shed", f"shedding new requests (503 + Retry-After) until under {self.config['low_watermark']:.0%} of the limit",
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
        backoff = RESTART_BACKOFF_S[min(mem.memory_restarts + 1, len(RESTART_BACKOFF_S) - 1)]
        mem.memory_restarts += 1
        mem.next_restart_at = now + backoff
        self._event(model, "restart", f"restarting the runner (memory restart {mem.memory_restarts}; next one no sooner than {backoff:g} s)",
                    used, limit, why, memory_restarts=mem.memory_restarts)
        if self.manager is not None:
            # its own task: a load can take minutes, and sampling (and the watchdog's
            # heartbeat) must go on meanwhile
            task = asyncio.get_running_loop().create_task(self.manager.restart_for_memory(model))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def note_cap_hit(self, model: "LoadedModel") -> None:
        """The runner's hard cap refused a batch (its usage reached the limit between two
        samples): the next tick treats the model as over its high watermark."""
        model.memory.cap_hits += 1
        model.memory.cap_hit_pending = True
        model.memory.under_since = None
        # A buffer lent for the failed batch (often the one the runner could not map) would
        # now sit idle outside the runner's cap, on top of a runner at its limit: unlink.
        model.pool.shrink()

    def _recover(self, model: "LoadedModel", now: float) -> None:
        mem = model.memory
        if mem.ladder_step == 0:
            return
        if mem.under_since is None:
            mem.under_since = now
        if mem.shedding:
            mem.shedding = False
            mem.shed_since = None
            self.events.record("memory_recovered", f"{model.name}: usage {mem.used_bytes / MB:.1f} MB is under the low watermark; "
                               "accepting requests again", model=model.name, step="shed_end", used_bytes=mem.used_bytes,
                               limit_bytes=mem.limit_bytes)
        if now - mem.under_since < RECOVER_AFTER_S:
            return
        configured = model.settings.max_batch_size
        if mem.effective_max_batch and mem.effective_max_batch < configured:
            new = min(configured, mem.effective_max_batch * 2)
            mem.effective_max_batch = None if new == configured else new
            if model.batcher:
                model.batcher.configure(max_batch_size=new)
            mem.under_since = now
            self.events.record("memory_recovered", f"{model.name}: effective max_batch_size back to {new}", model=model.name,
                               step="raise_batch", max_batch_size=new, used_bytes=mem.used_bytes)
            return
        mem.ladder_step = 0

    # --- reporting --------------------------------------------------------------------------

    def check_request(self, model: "LoadedModel", rows: int) -> None:
        """Refuse a request with 503 while the model sheds, or when it has more rows than the
        ladder's lowered batch size (it will fit again after recovery)."""
        mem = model.memory
        if mem.shedding:
            raise MemoryPressure(f"model {model.name!r} is over its memory high watermark and sheds load; retry later",
                                 SHED_RETRY_AFTER_S)
        if mem.effective_max_batch is not None and rows > mem.effective_max_batch and rows <= model.settings.max_batch_size:
            raise MemoryPressure(f"model {model.name!r} runs with max_batch_size {mem.effective_max_batch} under memory "
                                 f"pressure; this request has {rows} rows: retry later or split it", SHED_RETRY_AFTER_S)

    def snapshot(self) -> dict[str, Any]:
        """``GET /lm/v1/memory``."""
        devices = {}
        for device in self.devices():
            b = self.budget(device)
            used = self._device_used.get(device)
            devices[device] = {
                **b,
                "used_bytes": used,
                "committed_bytes": self.committed(device),
                "free_bytes": max(0, self.free(device)),
                "high_watermark_bytes": int(b["limit_bytes"] * self.config["high_watermark"]),
                "low_watermark_bytes": int(b["limit_bytes"] * self.config["low_watermark"]),
            }
        devices["host"]["lastmile_own_bytes"] = self._own_bytes
        try:
            import psutil

            devices["host"]["available_bytes"] = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001
            pass
        models = {}
        for m in self._models():
            pool = m.pool.stats()
            models[m.name] = {
                "state": m.state,
                **m.memory.as_dict(),
                "pool": {"bytes": pool["bytes_in_use"] + pool["bytes_idle"], "bytes_in_use": pool["bytes_in_use"],
                         "bytes_idle": pool["bytes_idle"], "hit_rate": pool["hit_rate"], "hits": pool["hits"],
                         "misses": pool["misses"], "segments": pool["segments"]},
            }
        return {"config": dict(self.config), "devices": devices, "models": models}
