"""The model manager: which models are loaded, their runner processes and batchers, and what
happens when a runner dies. The daemon's routes call it; it knows nothing of HTTP.

Lifecycle of a model: ``loading`` -> ``ready`` -> (runner died) ``restarting`` -> ``ready`` |
``failed``; ``unloading`` -> gone. Every transition is an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.models.store import ModelStore
from lastmile.models.vocabulary import LIVE_KEYS
from lastmile.runtime.backends import resolve_backend
from lastmile.runtime.batcher import Batcher, BatchInfo
from lastmile.runtime.errors import BatchTooLarge, InferenceError, LastmileRuntimeError, LoadError, ModelUnavailable, RequestTimeout, ShmError, describe_exit
from lastmile.runtime.events import EventLog
from lastmile.runtime.inference_stats import InferenceCounters
from lastmile.runtime.generation.config import is_generation_manifest
from lastmile.runtime.generation.runner import GenerationRunner, RefusedStream
from lastmile.runtime.generation.types import GenerationChunk, GenerationRequest, InvalidGenerationTarget
from lastmile.runtime.memory.errors import MemoryPressure
from lastmile.runtime.memory.estimate import Estimate
from lastmile.runtime.memory.governor import POOL_IDLE_SHARE, MemoryGovernor
from lastmile.runtime.memory.records import ModelMemory
from lastmile.runtime.memory.units import mib
from lastmile.runtime.precheck import check_load
from lastmile.runtime.forkserver import call_in_forkserver
from lastmile.runtime.pool import RunnerPool
from lastmile.runtime.runner import Runner
from lastmile.runtime.shm import BufferPool, PoolFull

logger = logging.getLogger("lastmile.manager")

PhaseCallback = Callable[[str, dict[str, Any]], None]
#: Waits between restarts of a model whose runner crashed (the memory ladder's own restarts
#: have their back-off in the governor).
CRASH_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# the settings a loaded model takes live are the batcher's knobs (keep_alive_s is the manager's)
BATCHER_KEYS = tuple(k for k in LIVE_KEYS if k != "keep_alive_s")
STALL_RESTART_AFTER = 3  # timeouts in a row with no batch finished before a runner is killed
SHM_EVENT_EVERY_S = 10.0


class SharedMemoryExhausted(LastmileRuntimeError):
    """``/dev/shm`` has no room for a batch's buffers (HTTP 507): the host's fault, not the
    request's; the model stays loaded and serves again once there is room."""


def process_state(pid: int) -> str:
    """A process's scheduler state from ``/proc`` (``stopped`` is what SIGSTOP leaves)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "gone"
    return {"R": "running", "S": "sleeping", "D": "in uninterruptible wait", "T": "stopped (SIGSTOP?)", "t": "stopped by a tracer",
            "Z": "zombie"}.get(state, state)


def runs_of(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a model's runner says it runs, from its own ``Ready`` report (``backend_info``):
    ``{"engine", "precision", "device", "dtype"}``; None until a runner has reported (the
    model is loading: nothing is guessed from the requested settings).

    Generation runners report ``engine`` ("ort-genai" / "deepspeed") with ``precision``
    (ORT-GenAI: int4/int8/fp32) or ``dtype`` (torch: float32/bfloat16); tensor runners report
    ``backend`` ("onnxruntime" / "deepspeed"), ``dtype`` and, for ONNX Runtime, the dtype
    the graph really holds (``graph_dtype``)."""
    if not info or ("engine" not in info and "backend" not in info):
        return None
    if info.get("generation"):
        engine = info.get("engine")
        dtype = _short_dtype(info.get("dtype"))
        precision = info.get("precision") or dtype
        dtype = dtype or precision
    else:
        engine = info.get("backend") or info.get("engine")
        dtype = _short_dtype(info.get("dtype"))
        graph = _short_dtype(info.get("graph_dtype"))
        precision = "fp16" if info.get("fp16_converted") else graph if graph in ("fp32", "fp16", "bf16") else dtype
    return {"engine": engine, "precision": precision, "device": info.get("device"), "dtype": dtype}


_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "int8"}


def _short_dtype(value: Any) -> str | None:
    """``torch.float32`` / ``float32`` -> ``fp32``: the words the settings use."""
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    return _DTYPE_SHORT.get(text, text)


def runs_text(runs: dict[str, Any] | None) -> str:
    """``ort-genai int4 on cpu``, or ``loading`` before the runner has reported."""
    if not runs:
        return "loading"
    parts = [str(runs.get("engine") or "?")]
    if runs.get("precision"):
        parts.append(str(runs["precision"]))
    if runs.get("dtype") and runs.get("dtype") != runs.get("precision"):
        parts.append(f"({runs['dtype']})")
    return " ".join(parts) + (f" on {runs['device']}" if runs.get("device") else "")


class ModelNotLoaded(KeyError):
    def __str__(self) -> str:
        return f"model {self.args[0]!r} is not loaded"


@dataclass
class LoadedModel:
    name: str
    manifest: Manifest
    settings: ModelSettings
    overrides: dict[str, Any]
    backend: str
    pool: BufferPool
    state: str = "loading"
    phase: str = "queued"
    error: str | None = None
    runners: RunnerPool = field(init=False)  # the runners and their free batch slots
    batcher: Batcher | None = None
    info: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    restarts: int = 0
    requests: int = 0
    failures: int = 0
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=2048))
    restart_task: asyncio.Task | None = None
    memory: ModelMemory = field(default_factory=ModelMemory)
    requested: ModelSettings | None = None  # the settings asked for (plan = "auto" may change them)
    counters: InferenceCounters = field(default_factory=InferenceCounters)  # Triton statistics, last error
    load_s: float = 0.0  # how long its runners took to start
    stall: dict[str, Any] = field(default_factory=dict)  # timeouts in a row with no batch finished
    generation: bool = False  # a causal LM served as token streams (runtime/generation), no batcher

    def __post_init__(self) -> None:
        self.runners = RunnerPool(self.name)

    def set_state(self, state: str, error: str | None = None) -> None:
        """Change the lifecycle state; a model that is not ``ready`` has its pool fail queued
        batches at once rather than leave them to time out."""
        self.state, self.error = state, error
        if state == "ready":
            self.runners.accept()
        else:
            self.runners.refuse(f"model {self.name!r} is {state}" + (f": {error}" if error else ""))

    def describe(self) -> dict[str, Any]:
        """The row ``GET /lm/v1/models`` shows for this model."""
        stats = self.batcher.stats() if self.batcher else {}
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        runs = self.runs()
        return {
            "name": self.name,
            "state": self.state,
            "phase": self.phase,
            "error": self.error,
            "backend": self.backend,
            "format": self.manifest.format,
            # what the runner reported it runs (None / "loading" until it has): every view reads these
            "runs": runs,
            "runs_text": runs_text(runs),
            "device": runs["device"] if runs and runs.get("device") else self.info.get("device", self.settings.device),
            "settings": self.settings.as_dict(),
            "overrides": self.overrides,
            "backend_info": self.info,
            "runners": self.runners.describe(),
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "restarts": self.restarts,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.counters.last_error,
            "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
            "queue_depth": stats.get("queue_depth", 0),
            "batcher": stats,
            "pool": self.pool.stats(),
            "memory": {k: v for k, v in self.memory.as_dict().items() if k != "estimate"},
            "fusion": self.fusion(),
            **({"generation": self.generation_stats()} if self.generation else {}),
        }

    def runs(self) -> dict[str, Any] | None:
        """What the runner reported it runs (:func:`runs_of` of ``backend_info``); None while
        the model has not reported yet."""
        return runs_of(self.info)

    def generation_stats(self) -> dict[str, Any]:
        """The runner's latest scheduler figures (engine, slots, KV, tokens, TTFT, inter-token),
        with ``engine``/``precision`` from the runner's own report (``runs``) and the engine's
        TTFT / inter-token p50/p99 in ms (the daemon's API figures replace these where the
        routes observe the streams: ``generation_metrics.live_fields``)."""
        runner = self.runners[0] if self.runners else None
        stats = dict(getattr(runner, "generation", None) or {})
        for key in ("engine", "max_num_seqs", "max_context"):
            stats.setdefault(key, self.info.get(key))
        for key in ("running", "waiting", "kv_used_bytes", "kv_reserved_bytes"):
            stats.setdefault(key, 0)
        runs = self.runs() or {}
        stats["engine"] = runs.get("engine") or stats.get("engine")
        stats["precision"] = runs.get("precision")
        for name, key in (("ttft", "ttft_s"), ("inter_token", "inter_token_s")):
            summary = stats.get(key) if isinstance(stats.get(key), dict) else {}
            for p in ("p50", "p99"):
                value = summary.get(p)
                stats.setdefault(f"{name}_{p}_ms", None if value is None else round(value * 1000, 3))
        stats.setdefault("tokens_per_s", None)
        return stats

    def fusion(self) -> dict[str, Any]:
        """The ``graph_fusion`` asked for and what the backend really applied."""
        info = self.info
        applied: Any
        if "graph_optimization_level" in info:
            applied = [info["graph_optimization_level"]]
        else:
            applied = info.get("fusion_applied")
        return {"requested": self.settings.graph_fusion, "applied": applied, "notes": info.get("fusion_notes", [])}


class ModelManager:
    """Owns every loaded model. ``on_change`` is called after each load/unload so the daemon
    can persist what is loaded."""

    def __init__(
        self,
        store: ModelStore,
        defaults: ModelSettings,
        events: EventLog,
        on_change: Callable[[], None] | None = None,
        *,
        memory: dict[str, Any] | MemoryGovernor | None = None,
    ) -> None:
        self.store = store
        self.defaults = defaults
        self.events = events
        self.on_change = on_change or (lambda: None)
        self.models: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = False
        self.governor = memory if isinstance(memory, MemoryGovernor) else MemoryGovernor(memory, events)
        self.governor.attach(self)  # the governor sees this manager only as a ModelHost (models, unload, restart)
        self._keep_alive_task: asyncio.Task | None = None

    # --- planning -------------------------------------------------------------------------

    def plan(self, name: str, overrides: dict[str, Any] | None = None) -> tuple[Manifest, ModelSettings, str]:
        """Manifest, effective settings and backend for a load, or the error that would stop it
        (unknown model, bad manifest, bad setting, backend/format mismatch) - nothing started."""
        manifest = self.store.get(name)
        settings = self.defaults.overlay(manifest.settings).overlay(overrides or {})
        if manifest.backend != "auto" and settings.backend == "auto":
            settings = settings.overlay({"backend": manifest.backend})
        return manifest, settings, resolve_backend(manifest, settings)

    def estimate(self, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """A dry run of :meth:`load`: the estimate, whether it fits now, and if not the
        options that would (nothing is started or unloaded)."""
        manifest, settings, backend = self.plan(name, overrides)
        return self.governor.dry_run(manifest, settings, backend)

    # --- load / unload ----------------------------------------------------------------------

    async def load(self, name: str, overrides: dict[str, Any] | None = None, on_phase: PhaseCallback | None = None) -> LoadedModel:
        """Load ``name`` (or reload it with new settings). Everything checkable is checked before
        a serving instance is touched (settings, device, dtype, artifact, memory: 4xx errors);
        a reload that still fails later leaves the previous instance serving."""
        overrides = dict(overrides or {})
        loop = asyncio.get_running_loop()
        # In a thread: the manifest may need its artifact's signature read (a forkserver child).
        manifest, settings, backend = await loop.run_in_executor(None, self.plan, name, overrides)
        await loop.run_in_executor(None, check_load, manifest, settings, backend, call_in_forkserver)
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self.models.get(name)
            if current and current.state == "ready" and (current.requested or current.settings) == settings:
                return current
            requested = settings
            settings, est, plan_taken = await self.governor.admit(manifest, settings, backend)
            self.governor.start()
            if self._keep_alive_task is None or self._keep_alive_task.done():
                self._keep_alive_task = asyncio.get_running_loop().create_task(self._keep_alive(), name="lastmile-keep-alive")
            # A serving model is replaced without dropping requests when the new runners fit
            # beside the old ones: start them, switch, then drain the old. Else stop it first,
            # and bring it back with its old settings if the new ones fail.
            swap = current is not None and current.state == "ready" and self._fits_beside(est)
            rollback = current is not None and not swap and current.state == "ready"
            if current and not swap:
                why = "not enough free memory to run both while switching" if current.state == "ready" else f"it is {current.state}"
                self.events.record("reload_in_place", f"{name} stops before its reload ({why}): requests in between get 503", model=name)
                await self._teardown(current, reason="reload with new settings")
            try:
                model = await self._start_instance(name, manifest, settings, overrides, backend, est, plan_taken, swap, on_phase)
            except Exception as exc:
                if rollback:
                    assert current is not None
                    await self._roll_back(current, exc)
                raise
            model.requested = requested
            if swap:
                assert current is not None
                self.models[name] = model  # new requests go to the new runners from here on
                await self._drain(current)
                self.events.record("switched", f"{name} switched to its new runners; the old ones drained and stopped", model=name)
            self.governor.release(f"{name}\0next" if swap else name)
            runs = model.runs()
            self.events.record("loaded", f"{name} loaded in {model.load_s} s, runs {runs_text(runs)}", model=name, load_s=model.load_s,
                               info=model.info, runs=runs, estimate_bytes=est.total_bytes, plan_taken=plan_taken)
            self.on_change()
            return model

    async def _start_instance(self, name: str, manifest: Manifest, settings: ModelSettings, overrides: dict[str, Any], backend: str,
                              est: Estimate, plan_taken: dict[str, Any] | None, swap: bool, on_phase: PhaseCallback | None) -> LoadedModel:
        """Runners and batcher of one instance of ``name``, registered under ``name`` unless it
        is a ``swap`` (the caller switches). On failure nothing of it is left (runners stopped,
        pool closed, reservation released) and the error is an event."""
        pool = BufferPool(f"lastmile-{os.getpid()}-{name}-")
        model = LoadedModel(name, manifest, settings, overrides, backend, pool)
        model.generation = is_generation_manifest(manifest)
        model.memory.estimate = est
        model.memory.device = next((d for d in est.per_device if d != "host"), "host")
        model.memory.limit_bytes = mib(settings.memory_limit_mb)
        model.memory.plan_taken = plan_taken
        if model.memory.limit_bytes:
            # idle pool buffers count against the limit: keep at most a quarter of it idle
            pool.max_idle_bytes = min(pool.max_idle_bytes, int(model.memory.limit_bytes * POOL_IDLE_SHARE))
        reservation = f"{name}\0next" if swap else name
        if not swap:
            self.models[name] = model
        self.governor.reserve(reservation, est)
        # what will run is known only once the runner reports it (the "loaded" event says it)
        self.events.record("load_started", f"loading {name}", model=name, settings=settings.as_dict(),
                           estimate_bytes=est.total_bytes, plan_taken=plan_taken)

        def phase(step: str, data: dict[str, Any]) -> None:
            model.phase = step
            if on_phase:
                on_phase(step, data)

        started = time.monotonic()
        try:
            await self._start_runners(model, phase)
            self.governor.check_ready(model)  # 507 when the idle runner already sits where the ladder would act
        except BaseException as exc:
            model.state, model.error = "failed", str(exc)
            await model.runners.stop()
            pool.close()
            self.governor.release(reservation)
            if self.models.get(name) is model:
                del self.models[name]
            kept = "; the running instance keeps serving" if swap else ""
            self.events.record("load_failed", f"{name} failed to load: {exc}{kept}", model=name, level="error")
            raise
        if not model.generation:  # a generation runner schedules its own sequences
            model.batcher = Batcher(
                model.runners.run,
                concurrency=settings.instances,
                pool=model.pool,  # concatenate requests straight into shared memory
                **{k: getattr(settings, k) for k in BATCHER_KEYS},
            )
        model.state, model.phase = "ready", "ready"
        model.loaded_at = model.last_used = time.time()
        model.load_s = round(time.monotonic() - started, 3)
        return model

    async def _roll_back(self, old: LoadedModel, exc: BaseException) -> None:
        """An in-place reload failed after the old runners stopped: start the old settings
        again, so a failed change never leaves the model down when it was serving."""
        name = old.name
        est = old.memory.estimate
        try:
            model = await self._start_instance(name, old.manifest, old.settings, old.overrides, old.backend, est,
                                               old.memory.plan_taken, False, None)
        except Exception as again:  # noqa: BLE001 - reported; the original error is what the caller sees
            self.events.record("rollback_failed", f"{name}: its reload failed ({exc}) and its previous settings did not "
                               f"start again either: {again}", model=name, level="error")
            return
        model.requested = old.requested
        model.restarts = old.restarts
        self.governor.release(name)
        self.events.record("reload_rolled_back", f"{name}: reload failed ({exc}); the running instance keeps serving "
                           "with its previous settings (its runners were restarted)", model=name, level="error")

    async def _start_runners(self, model: LoadedModel, phase: PhaseCallback) -> None:
        for instance in range(model.settings.instances):
            runner_class = GenerationRunner if model.generation else Runner
            runner = runner_class(model.manifest, model.settings, pool=model.pool, instance=instance)
            runner.on_exit = lambda r, code, m=model: self._runner_died(m, r, code)
            # A failed start leaves no process behind (Runner.start kills it), so the runner
            # joins the pool only once it is ready.
            model.info = await runner.start(on_phase=phase, timeout_s=model.settings.load_timeout_s)
            model.memory.cap = dict(model.info.get("hard_cap") or {})
            if model.memory.cap.get("error"):  # over its limit after warm-up: OverLimitAtReady (a LoadError; 507)
                await runner.stop()
                self.governor.check_ready(model)
            model.runners.add(runner)
        headroom = model.memory.cap.get("headroom_bytes")
        if headroom:
            # The pool's segments count against the limit too: never more of them than the
            # room the runner had left at "ready" (a batch needing more fails alone, 503).
            model.pool.max_bytes = int(headroom)

    async def unload(self, name: str, reason: str = "unloaded by request", drain: bool = False) -> None:
        """Stop ``name`` now, or with ``drain`` after its running work ended (see ``_drain``;
        new requests get 503 meanwhile)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.models.get(name)
            if model is None:
                raise ModelNotLoaded(name)
            if drain:
                model.set_state("draining")
                await self._drain(model, reason)
            else:
                await self._teardown(model, reason)
            self.events.record("unloaded", f"{name} {reason}", model=name)
            self.on_change()

    async def _teardown(self, model: LoadedModel, reason: str) -> None:
        model.set_state("unloading")
        if model.restart_task:
            model.restart_task.cancel()
        if model.batcher:
            await model.batcher.close(f"model {model.name} is being {reason}")
        await model.runners.stop()
        model.pool.close()
        if self.models.get(model.name) is model:
            del self.models[model.name]

    def _fits_beside(self, est: Estimate) -> bool:
        """Whether the new instance fits while the old one still holds its memory."""
        return all(self.governor.free(device) >= need for device, need in est.per_device.items())

    async def _drain(self, old: LoadedModel, reason: str = "replaced by its reload") -> None:
        """Let the work already on the old instance finish, then stop it: queued and in-flight
        batches, and running generation streams (each bounded by the model's ``timeout_s``,
        so the wait is too); what is still running after that is cut, with ``reason``."""
        deadline = time.monotonic() + old.settings.timeout_s + 1.0
        while time.monotonic() < deadline:
            stats = old.batcher.stats() if old.batcher else {}
            if not stats.get("queue_depth") and not stats.get("in_flight") and not any(r.busy for r in old.runners):
                break
            await asyncio.sleep(0.01)
        await self._teardown(old, reason=reason)

    async def _keep_alive(self, every_s: float = 1.0) -> None:
        """Unload a model idle for longer than its ``keep_alive_s`` (0: never): no request
        since then and nothing in flight (no batch, no generation stream)."""
        while not self._closing:
            await asyncio.sleep(every_s)
            now = time.time()
            for model in list(self.models.values()):
                keep = model.settings.keep_alive_s
                last = max([model.last_used, *(getattr(r, "last_activity", 0.0) for r in model.runners)])
                if not keep or model.state != "ready" or now - last < keep:
                    continue
                if any(r.busy for r in model.runners) or (model.batcher and model.batcher.stats().get("queue_depth")):
                    continue
                try:
                    await self.unload(model.name, reason=f"unloaded after {keep:g} s idle (keep_alive_s)")
                except ModelNotLoaded:
                    pass
                except Exception:  # noqa: BLE001 - the next tick tries again
                    logger.exception("keep_alive unload of %s failed", model.name)

    async def close(self) -> None:
        """Stop every runner (daemon shutdown); state is kept so the next start restores it."""
        self._closing = True
        if self._keep_alive_task is not None:
            self._keep_alive_task.cancel()
        self.governor.close()
        for model in list(self.models.values()):
            await self._teardown(model, "stopped with the daemon")

    # --- serving ----------------------------------------------------------------------------

    def get(self, name: str) -> LoadedModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotLoaded(name)
        return model

    async def infer(self, name: str, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], BatchInfo]:
        model = self.get(name)
        if model.state != "ready" or model.batcher is None:
            raise ModelUnavailable(f"model {name!r} is {model.state}" + (f": {model.error}" if model.error else ""))
        if model.memory.shedding or model.memory.effective_max_batch is not None:
            first = next(iter(inputs.values()), None)
            rows = int(first.shape[0]) if first is not None and getattr(first, "ndim", 0) else 1
            self.governor.check_request(model, rows)
        model.last_used = time.time()
        self.governor.poke()  # the memory sampler back to its fast pace after a quiet spell
        model.requests += 1
        started = time.perf_counter()
        try:
            outputs, info = await self._submit(model, name, inputs)
        except BaseException as exc:
            model.counters.failed(exc, time.perf_counter() - started)
            raise
        total_s = time.perf_counter() - started
        first = next(iter(inputs.values()), None)
        model.counters.succeeded(int(first.shape[0]) if getattr(first, "ndim", 0) else 1, total_s, info)
        model.latencies_s.append(total_s)
        return outputs, info

    async def _submit(self, model: LoadedModel, name: str, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Any]:
        """The batcher call with the failure bookkeeping of each kind of error."""
        try:
            outputs, info = await model.batcher.submit(inputs)
        except BatchTooLarge as exc:
            model.failures += 1
            if model.memory.effective_max_batch is not None and exc.rows <= model.settings.max_batch_size:
                # queued before the ladder lowered the batch size: it fits again after recovery
                raise MemoryPressure(f"model {name!r} lowered its max_batch_size to {model.memory.effective_max_batch} "
                                     f"under memory pressure; this request has {exc.rows} rows: retry later or split it") from exc
            raise
        except RequestTimeout as exc:
            model.failures += 1
            self._note_timeout(model, exc)
            raise
        except PoolFull as exc:
            model.failures += 1
            self.governor.note_cap_hit(model)
            self.events.record("memory_cap_hit", f"{name}: the batch's buffers do not fit the model's memory headroom: {exc}",
                               model=name, level="warning", step="pool_cap", pool_max_bytes=model.pool.max_bytes)
            raise MemoryPressure(f"model {name!r}: this batch needs more buffer memory than the model's memory_limit_mb "
                                 f"allows ({exc}); retry with fewer rows or shorter inputs") from exc
        except ShmError as exc:
            model.failures += 1
            raise self._shm_exhausted(model, str(exc)) from exc
        except InferenceError as exc:
            model.failures += 1
            if _is_shm_exhaustion(str(exc)):
                raise self._shm_exhausted(model, str(exc)) from exc
            if model.memory.cap and _is_allocation_failure(str(exc)):
                self.governor.note_cap_hit(model)
                self.events.record("memory_cap_hit", f"{name}: a batch needed more than the runner's memory cap and failed alone: {exc}",
                                   model=name, level="warning", step="hard_cap", cap=model.memory.cap)
                raise MemoryPressure(f"model {name!r}: this batch needs more memory than the model's memory_limit_mb "
                                     f"allows ({exc}); retry with fewer rows or shorter inputs") from exc
            raise
        except BaseException:
            model.failures += 1
            raise
        model.stall.clear()
        return outputs, info

    def _note_timeout(self, model: LoadedModel, exc: RequestTimeout) -> None:
        """A request timed out: if no runner of the model finished a batch since the streak of
        timeouts began, the runner is stalled (stopped, hung in native code): an event, and
        after ``STALL_RESTART_AFTER`` timeouts in a row its runners are killed, which the
        runner-died path restarts. A model that is merely slow keeps finishing batches and is
        left alone."""
        done = sum(r.batches for r in model.runners)
        stall = model.stall
        if stall.get("batches") != done:
            stall.clear()
            stall.update(batches=done, timeouts=0, reported=False)
        stall["timeouts"] += 1
        states = {r.pid: process_state(r.pid) for r in model.runners if r.pid}
        described = ", ".join(f"{pid} {state}" for pid, state in states.items())
        if not stall["reported"]:
            stall["reported"] = True
            self.events.record("runner_stalled", f"{model.name}: a request timed out after {exc.timeout_s:g} s and its runner "
                               f"finished no batch meanwhile (runner {described}); restarting it after "
                               f"{STALL_RESTART_AFTER} timeouts in a row", model=model.name, level="warning", runners=states)
        if stall["timeouts"] >= STALL_RESTART_AFTER and model.state == "ready":
            self.events.record("runner_stalled", f"{model.name}: {stall['timeouts']} requests in a row timed out with no batch "
                               f"finished (runner {described}); killing its runner to restart it", model=model.name,
                               level="error", runners=states)
            stall.clear()
            for runner in list(model.runners):
                runner.kill()  # the runner-died path records it and restarts

    def _shm_exhausted(self, model: LoadedModel, detail: str) -> Exception:
        """Shared memory (``/dev/shm``) is full: an event (at most one per model every
        ``SHM_EVENT_EVERY_S``) and a 507 for the request; the model stays loaded."""
        now = time.monotonic()
        if now - model.stall.get("shm_event_at", -1e9) >= SHM_EVENT_EVERY_S:
            model.stall["shm_event_at"] = now
            self.events.record("shm_exhausted", f"{model.name}: shared memory is full, a batch could not get its buffers: {detail}",
                               model=model.name, level="error")
        return SharedMemoryExhausted(f"model {model.name!r}: shared memory (/dev/shm) is full, this batch could not get its "
                                     f"buffers ({detail}); free space in /dev/shm or send smaller batches")

    def generate(self, name: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one generation from a loaded generation model. Refusals (``ContextOverflow``,
        ``QueueFull``, ``ModelUnavailable``...) are raised by the first ``__anext__``, before
        any chunk; ``aclose()`` cancels the sequence in the runner (slot and KV freed)."""
        model = self.models.get(name)
        if model is None:
            return RefusedStream(ModelNotLoaded(name))
        if not model.generation:
            return RefusedStream(InvalidGenerationTarget(
                f"model {name!r} is not a generation model (format {model.manifest.format}, backend {model.backend}); "
                "generation needs a causal-LM folder"))
        if model.state != "ready" or not model.runners:
            return RefusedStream(ModelUnavailable(f"model {name!r} is {model.state}" + (f": {model.error}" if model.error else "")))
        try:
            self.governor.check_request(model, 1)  # the ladder's shed step: 503 + Retry-After
        except MemoryPressure as exc:
            return RefusedStream(exc)
        model.last_used = time.time()
        model.requests += 1
        return model.runners[0].generate(request)

    def configure(self, name: str, changes: dict[str, Any]) -> LoadedModel:
        """Live changes that need no reload (batching knobs); others go through :meth:`load`."""
        model = self.get(name)
        model.settings = model.settings.overlay(changes)
        model.overrides.update(changes)
        if model.batcher:
            model.batcher.configure(**{k: v for k, v in changes.items() if k in BATCHER_KEYS})
        said = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in changes.items())
        self.events.record("tuned", f"{name} settings changed: {said}", model=name, changes=changes)
        self.on_change()
        return model

    async def restart_for_memory(self, model: LoadedModel) -> None:
        """Ladder step 4: a fresh runner (the old one's memory goes back to the OS). Requests
        arriving meanwhile get 503; the back-off between memory restarts is the governor's."""
        if model.name not in self.models or model.state != "ready":
            return
        model.set_state("restarting", "restarting the runner to give memory back")
        try:
            await model.runners.stop()
            model.pool.shrink()
            await self._start_runners(model, lambda step, data: setattr(model, "phase", step))
        except LoadError as exc:
            model.set_state("failed", str(exc))
            self.events.record("restart_failed", f"{model.name} memory restart failed: {exc}", model=model.name, level="error")
            if model.restart_task is None or model.restart_task.done():
                model.restart_task = asyncio.get_running_loop().create_task(self._restart(model))
            return
        model.restarts += 1
        model.set_state("ready")
        model.phase = "ready"
        self.events.record("restarted", f"{model.name} runner restarted to give memory back, runs {runs_text(model.runs())}",
                           model=model.name, reason="memory", runs=model.runs())

    # --- failure handling -------------------------------------------------------------------

    def _runner_died(self, model: LoadedModel, runner: Runner, exitcode: int | None) -> None:
        if self._closing or model.state in ("unloading", "draining") or runner not in model.runners:
            return
        reason = f"runner {runner.pid} of {model.name} died ({describe_exit(exitcode)})"
        model.set_state("restarting", reason)
        self.events.record("runner_died", reason, model=model.name, level="error", exitcode=exitcode, pid=runner.pid)
        if model.restart_task is None or model.restart_task.done():
            model.restart_task = asyncio.get_running_loop().create_task(self._restart(model))

    async def _restart(self, model: LoadedModel) -> None:
        attempt = 0
        while model.name in self.models and model.state in ("restarting", "failed"):
            delay = CRASH_RESTART_BACKOFF_S[min(attempt, len(CRASH_RESTART_BACKOFF_S) - 1)]
            await asyncio.sleep(delay)
            attempt += 1
            model.restarts += 1
            await model.runners.stop()
            try:
                await self._start_runners(model, lambda step, data: setattr(model, "phase", step))
            except LoadError as exc:
                model.set_state("failed", str(exc))
                next_s = CRASH_RESTART_BACKOFF_S[min(attempt, len(CRASH_RESTART_BACKOFF_S) - 1)]
                self.events.record("restart_failed", f"{model.name} restart {attempt} failed: {exc}; next try in {next_s} s", model=model.name, level="error")
                continue
            model.set_state("ready")
            model.phase = "ready"
            self.events.record("restarted", f"{model.name} runner restarted (attempt {attempt}), runs {runs_text(model.runs())}",
                               model=model.name, attempt=attempt, runs=model.runs())


def _is_shm_exhaustion(text: str) -> bool:
    """Whether a runner's error text is the pool's refusal to reserve shared memory."""
    return "cannot reserve" in text and "shared memory" in text


_ALLOCATION_WORDS = ("can't allocate memory", "cannot allocate memory", "failed to allocate", "memoryerror", "bad_alloc",
                     "out of memory", "std::bad_alloc", "pool's cap")


def _is_allocation_failure(text: str) -> bool:
    """Whether a backend's error text is an allocation refused (the runner's memory cap)."""
    low = text.lower()
    return any(word in low for word in _ALLOCATION_WORDS)
