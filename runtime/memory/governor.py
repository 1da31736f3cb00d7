"""The memory governor: one object the model manager and the routes talk to, made of the
room's parts (budgets, admission, sampler, ladder, footprint records).

Vocabulary (all bytes; see docs/memory.md):

- *budget* of a device (``host``, ``cuda:0``...): ``[memory] host_limit_mb`` /
  ``device_limit_mb``, or a fraction of what the device has. Changeable at run time
  (:meth:`MemoryGovernor.configure`, ``PUT /lm/v1/memory``).
- *used* by a model: its runners' USS (private memory: what unloading gives back, and what the
  runner's hard cap holds under the limit) plus its shared-memory pool, and on an accelerator
  what the backend reports (torch's reserved bytes).
- *committed* by a model: ``max(estimate, used)``: a model that has not yet grown to its
  estimate keeps the room it was admitted with.
- *own*: lastmile's own processes (daemon, forkserver), their anonymous pages.
- *free* on a device: budget minus own minus every model's committed bytes; on the host also
  never more than the OS says is available.

The governor never imports the model manager: the manager attaches itself as a
:class:`~lastmile.runtime.memory.protocol.ModelHost` (models view, unload, restart).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.generation.config import is_generation_manifest
from lastmile.runtime.generation.memory import generation_estimate
from lastmile.runtime.memory import cgroup, procfs
from lastmile.runtime.memory.admission import Admission
from lastmile.runtime.memory.budget import Budgets
from lastmile.runtime.memory.errors import OverLimitAtReady
from lastmile.runtime.memory.estimate import Estimate, budget_device, estimate
from lastmile.runtime.memory.footprints import FootprintBook
from lastmile.runtime.memory.ladder import Ladder
from lastmile.runtime.memory.policy import DEFAULTS, check_memory_config
from lastmile.runtime.memory.sampler import Sampler
from lastmile.runtime.memory.units import MiB, human

if TYPE_CHECKING:
    from pathlib import Path

    from lastmile.runtime.events import EventLog
    from lastmile.runtime.memory.protocol import ModelHost

POOL_IDLE_SHARE = 0.25  # a model with a limit keeps at most this share of it as idle pool buffers


class MemoryGovernor:
    """Budgets, admission, sampling and the ladder for the models of one :class:`ModelHost`."""

    def __init__(self, config: dict[str, Any] | None, events: "EventLog", *, accelerators: dict[str, int] | None = None,
                 footprints: "Path | None" = None) -> None:
        self.config: dict[str, Any] = {**DEFAULTS, **(config or {})}  # changed in place: the parts share it
        check_memory_config(self.config)
        self.events = events
        self.host: ModelHost | None = None
        self.heart: Any = None  # anything with .beat(): the systemd watchdog's health check
        self.budgets = Budgets(self.config, accelerators)
        self.admission = Admission(self)
        self.ladder = Ladder(self)
        self.sampler = Sampler(self)
        self.footprints = FootprintBook(footprints)
        self.device_used: dict[str, int] = {}
        self._reserved: dict[str, Estimate] = {}  # loads in progress

    def attach(self, host: "ModelHost") -> None:
        """The models this governor watches, and who unloads and restarts them."""
        self.host = host

    def models(self) -> list[Any]:
        return list(self.host.models.values()) if self.host else []

    # --- budgets ----------------------------------------------------------------------------

    @property
    def accelerators(self) -> dict[str, int]:
        return self.budgets.accelerators

    def budget(self, device: str) -> dict[str, Any]:
        return self.budgets.budget(device)

    def devices(self) -> list[str]:
        return self.budgets.devices()

    @property
    def own_bytes(self) -> int:
        return self.sampler.own_bytes

    def committed(self, device: str, *, exclude: str | None = None) -> int:
        total = self.own_bytes if device == "host" else 0
        loaded = self.host.models if self.host else {}
        for m in self.models():
            if m.name != exclude:
                total += m.memory.committed_on(device)
        for name, est in self._reserved.items():
            if name != exclude and name not in loaded:
                total += est.per_device.get(device, 0)
        return total

    def free(self, device: str, *, exclude: str | None = None) -> int:
        free = self.budget(device)["limit_bytes"] - self.committed(device, exclude=exclude)
        if device == "host":
            # Room the OS has, minus what admitted models may still grow into.
            promised = sum(max(0, m.memory.committed_on("host") - m.memory.used_on("host"))
                           for m in self.models() if m.name != exclude)
            free = min(free, self.budgets.host_available() - promised)
        return free

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply already type-checked ``changes`` (keys of ``[memory]``) after the cross-key
        rules; nothing changes when one is wrong (ValueError naming the key)."""
        unknown = [k for k in changes if k not in DEFAULTS]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown memory setting; known: {', '.join(DEFAULTS)}")
        new = {**self.config, **changes}
        check_memory_config(new)
        changed = {k: v for k, v in changes.items() if self.config.get(k) != v}
        self.config.update(new)
        if changed:
            self.events.record("memory_configured", f"memory settings changed: {changed}", changes=changed)
            self.sampler.poke()
        return self.config

    # --- estimates and admission ------------------------------------------------------------

    def _device_of(self, settings: ModelSettings) -> str:
        if settings.device != "auto":
            return settings.device
        accel = [d for d in self.accelerators if d.startswith("cuda")]
        return accel[0] if accel else "cpu"

    def estimate(self, manifest: Manifest, settings: ModelSettings, backend: str) -> Estimate:
        """The static estimate, corrected by the recorded footprint of the same artifact when
        there is one (the digest is known only once :meth:`admit` computed it, off the loop)."""
        device = self._device_of(settings)
        if is_generation_manifest(manifest):  # weights + slots x context x KV bytes per token
            gen = generation_estimate(manifest, settings, device)
            gen.kind = "generation"
            return gen
        est = estimate(manifest, settings, backend, device)
        digest = self.footprints.cached_digest(manifest.artifact)
        if digest is None or budget_device(device) != "host":
            return est
        est.artifact_key = self.footprints.key(digest, backend, settings, budget_device(device))
        rec = self.footprints.get(est.artifact_key)
        if rec is None:
            return est
        per_instance = rec["measured_bytes"] - rec["static_estimate_bytes"]
        return est.corrected(per_instance * settings.instances,
                             f"corrected by this artifact's measured footprint (sha256 {rec['sha256'][:12]}): "
                             f"{human(rec['measured_bytes'])} used vs {human(rec['static_estimate_bytes'])} estimated per instance")

    def options(self, manifest: Manifest, settings: ModelSettings, backend: str) -> list[dict[str, Any]]:
        return self.admission.options(manifest, settings, backend)

    def dry_run(self, manifest: Manifest, settings: ModelSettings, backend: str) -> dict[str, Any]:
        return self.admission.dry_run(manifest, settings, backend)

    async def admit(self, manifest: Manifest, settings: ModelSettings, backend: str) -> tuple[ModelSettings, Estimate, dict[str, Any] | None]:
        """See :meth:`Admission.admit`; the artifact's digest is computed first (a thread:
        it reads the whole artifact once per change) so a recorded footprint applies."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.footprints.digest, manifest.artifact)
        except OSError:
            pass  # unreadable artifact: the backend says so with its own words
        self.sampler.models_changed()
        return await self.admission.admit(manifest, settings, backend)

    def check_ready(self, model: Any) -> None:
        """After a runner reached "ready": refuse (507, :class:`OverLimitAtReady`) a model
        whose runners already hold more than it may idle at (``low_watermark x limit``), or
        that its cap found over the limit: the ladder would act on it with no traffic and it
        could never serve. Reads USS as the cap does."""
        mem = model.memory
        if not mem.limit_bytes or budget_device(mem.device) != "host":
            return
        used = 0
        for runner in model.runners:
            try:
                used += procfs.rollup(runner.pid)["uss"] if runner.pid else 0
            except OSError:
                pass
        if mem.cap.get("error"):
            used = max(used, int(mem.cap.get("uss_at_cap_bytes") or mem.limit_bytes))
        _, idle_most = self.admission.limit_lines(mem.limit_bytes)
        if used <= idle_most and not mem.cap.get("error"):
            return
        est = mem.estimate
        need_mb = self.admission.needed_limit_mb(est) if est else 0
        idle_mb = int(used / self.config["low_watermark"] / MiB) + 1
        raise_to = max(need_mb, idle_mb)
        options = [{"option": "raise_limit", "settings": {"memory_limit_mb": raise_to}, "estimate_bytes": est.total_bytes if est else None,
                    "description": f"memory_limit_mb {raise_to} instead of {mem.limit_bytes // MiB} (the runner idles at {human(used)})"}]
        most, _ = self.admission.limit_lines(mem.limit_bytes)
        short = {"device": "host", "reason": "model_limit", "needed_bytes": used, "free_bytes": mem.limit_bytes,
                 "limit_bytes": mem.limit_bytes, "usable_bytes": most, "idle_bytes": used, "idle_usable_bytes": idle_most,
                 "measured": True}
        refusal = self.admission.refusal(model.name, short, est, options, measured=True) if est else None
        raise OverLimitAtReady(str(refusal) if refusal else f"model {model.name!r} idles at {human(used)}",
                               refusal.detail if refusal else short)

    def record_footprint(self, model: Any) -> None:
        """The model's first full reading after "ready" goes into the footprint records: what
        its runners hold plus the pool the estimate planned for, per instance, beside the
        static estimate for the same settings (the pool fills only with traffic)."""
        est = model.memory.estimate
        if est is None or est.artifact_key is None or model.memory.ready_bytes is None:
            return
        model.memory.recorded = self.footprints.get(est.artifact_key)
        instances = max(1, model.settings.instances)
        static = est.per_device.get("host", 0) - est.measured_correction_bytes
        measured = model.memory.uss_bytes + est.pool_bytes
        rec = self.footprints.record(est.artifact_key, model=model.name, artifact=model.manifest.artifact,
                                     measured_bytes=measured // instances, static_bytes=static // instances,
                                     settings=model.settings)
        if rec is not None:
            model.memory.recorded = rec
            self.events.record("footprint_recorded", f"{model.name}: measured {human(rec['measured_bytes'])} per instance "
                               f"vs {human(rec['static_estimate_bytes'])} estimated ({rec['error']:+.0%}); the next "
                               "admission of this artifact uses the measured figure", model=model.name,
                               measured_bytes=rec["measured_bytes"], static_estimate_bytes=rec["static_estimate_bytes"],
                               error=rec["error"], sha256=rec["sha256"])

    def reserve(self, name: str, est: Estimate) -> None:
        self._reserved[name] = est
        self.sampler.models_changed()

    def release(self, name: str) -> None:
        self._reserved.pop(name, None)
        self.sampler.models_changed()

    # --- sampling and the ladder ------------------------------------------------------------

    def supervise(self, heart: Any) -> Any:
        """Beat ``heart`` (``lastmile.appliance.server.sdnotify.Heartbeat``) after every sampling
        round and start sampling now (models or not), so the systemd watchdog stops pinging
        when runner supervision is stuck. Returns ``heart`` (the watchdog's health check)."""
        self.heart = heart
        self.start()
        return heart

    def start(self) -> None:
        self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()

    def close(self) -> None:
        """Stop sampling and any memory restart in progress (daemon shutdown)."""
        self.stop()
        self.ladder.close()

    def poke(self) -> None:
        """A request arrived: keep (or get back to) the fast sampling pace."""
        self.sampler.poke()

    async def sample_once(self) -> None:
        await self.sampler.sample()

    def check_request(self, model: Any, rows: int) -> None:
        self.ladder.check_request(model, rows)

    def note_cap_hit(self, model: Any) -> None:
        self.ladder.note_cap_hit(model)
        self.sampler.poke()

    # --- reporting --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """``GET /lm/v1/memory``."""
        devices = {}
        for device in self.devices():
            b = self.budget(device)
            devices[device] = {
                **b,
                "used_bytes": self.device_used.get(device),
                "committed_bytes": self.committed(device),
                "free_bytes": max(0, self.free(device)),
                "high_watermark_bytes": int(b["limit_bytes"] * self.config["high_watermark"]),
                "low_watermark_bytes": int(b["limit_bytes"] * self.config["low_watermark"]),
            }
        devices["host"]["lastmile_own_bytes"] = self.own_bytes
        devices["host"]["lastmile_own_measure"] = "anonymous"
        try:
            devices["host"]["available_bytes"] = self.budgets.host_available()
            group = cgroup.read()
            devices["host"]["cgroup"] = group.as_dict() if group else None
        except OSError:
            pass
        models = {}
        for m in self.models():
            pool = m.pool.stats()
            models[m.name] = {
                "state": m.state,
                **m.memory.as_dict(),
                "pool": {"bytes": pool["bytes_in_use"] + pool["bytes_idle"], "bytes_in_use": pool["bytes_in_use"],
                         "bytes_idle": pool["bytes_idle"], "hit_rate": pool["hit_rate"], "hits": pool["hits"],
                         "misses": pool["misses"], "segments": pool["segments"]},
            }
        sampler = {"interval_s": self.sampler.interval_s, "quiet": self.sampler.quiet, "rounds": self.sampler.rounds,
                   "full_reads": self.sampler.full_reads}
        return {"config": dict(self.config), "devices": devices, "models": models, "sampler": sampler}
