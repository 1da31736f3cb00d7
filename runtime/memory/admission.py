"""Admission: whether a load fits before anything starts, and what would fit when it does not.

A load fits when, on its main device, its estimate stays under the model's own limit the way
the ladder will hold it (the whole estimate under ``high_watermark x memory_limit_mb``, and
what an idle runner holds, the estimate without its workspace and pool buffers, under
``low_watermark x memory_limit_mb``: otherwise an idle runner would sit above the line where shedding stops and
never serve), and when every device's free budget holds its part. Not fitting is
:class:`InsufficientMemory` (HTTP 507) with the numbers and the options that would fit, best
first; ``plan = "auto"`` and ``evict_idle`` take one of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Iterable

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.generation.config import is_generation_manifest
from lastmile.runtime.memory.errors import InsufficientMemory
from lastmile.runtime.memory.estimate import Estimate, budget_device
from lastmile.runtime.memory.units import MiB, human, mib

if TYPE_CHECKING:
    from lastmile.runtime.memory.governor import MemoryGovernor

# Options that are advice for the operator, never taken by plan = "auto" (they change what
# the operator decided: a model's limit, the appliance's budget).
ADVICE = ("raise_limit", "raise_budget")
ADVICE_MARGIN_MIB = 4  # a suggested budget keeps this margin: own memory moves by a MiB or two
#: A ``memory_limit_mb`` advised from a static estimate (no footprint of the artifact recorded
#: yet) has this much headroom: static estimates run up to ~10 % under what a runner holds at
#: ready (demo-mlp-ts: 15.3 MiB estimated idle, 16.6 MiB measured), and advice that is then
#: refused at ready sends the operator round again (16 -> 20 -> 21).
STATIC_ADVICE_FACTOR = 1.15


class Admission:
    def __init__(self, governor: "MemoryGovernor") -> None:
        self.gov = governor

    def estimate(self, manifest: Manifest, settings: ModelSettings, backend: str) -> Estimate:
        """The governor's estimate; with a ``memory_limit_mb`` and no footprint recorded yet
        for this artifact *with* a limit, the one recorded without a limit corrects it (the
        same runner, plus the limit machinery the static estimate already counts). Without
        this a limit made the estimate drop what the artifact was measured to use, and the
        ``memory_limit_mb`` advised from it was refused once the runner was up."""
        est = self.gov.estimate(manifest, settings, backend)
        if est.kind != "tensor" or not settings.memory_limit_mb or est.source != "static" or est.artifact_key is None:
            return est
        book = self.gov.footprints
        digest = book.cached_digest(manifest.artifact)
        if digest is None:
            return est
        unlimited = dataclasses.replace(settings, memory_limit_mb=None)
        rec = book.get(book.key(digest, backend, unlimited, budget_device(est.device)))
        if rec is None:
            return est
        per_instance = rec["measured_bytes"] - rec["static_estimate_bytes"]
        return est.corrected(per_instance * settings.instances,
                             f"corrected by this artifact's measured footprint without a limit (sha256 {rec['sha256'][:12]}): "
                             f"{human(rec['measured_bytes'])} used vs {human(rec['static_estimate_bytes'])} estimated per instance")

    def limit_lines(self, limit_bytes: int) -> tuple[int, int]:
        """(most the whole estimate may be, most an idle runner may hold) under a limit."""
        cfg = self.gov.config
        return int(cfg["high_watermark"] * limit_bytes), int(cfg["low_watermark"] * limit_bytes)

    @staticmethod
    def idle_part(est: Estimate) -> int:
        """What an idle runner holds of ``est`` on its main device: not the workspace of a
        batch, and not the pool's buffers (given back at rest, and the first thing the ladder
        unlinks)."""
        target = budget_device(est.device)
        return est.per_device.get(target, 0) - est.workspace_bytes - (est.pool_bytes if target == "host" else 0)

    def needed_limit_mb(self, est: Estimate) -> int:
        """The smallest ``memory_limit_mb`` under which ``est`` is admitted."""
        total = est.per_device.get(budget_device(est.device), 0)
        idle = self.idle_part(est)
        cfg = self.gov.config
        need = max(total / cfg["high_watermark"], idle / cfg["low_watermark"])
        if est.source == "static" and est.kind == "tensor":
            need *= STATIC_ADVICE_FACTOR
        return int(math.ceil(need / MiB))

    def shortfall(self, est: Estimate, limit_mb: int | None, exclude: str, evicted: Iterable[str] = ()) -> dict[str, Any] | None:
        """The first reason ``est`` does not fit (None when it fits)."""
        evicted = set(evicted)
        target = budget_device(est.device)
        limit = mib(limit_mb)
        if limit is not None:
            need = est.per_device.get(target, 0)
            most, idle_most = self.limit_lines(limit)
            idle = self.idle_part(est)
            if est.kind == "generation":  # not yet held to the watermark lines (see docs/memory.md)
                most, idle_most = limit, limit
            if need > most or idle > idle_most:
                return {"device": target, "reason": "model_limit", "needed_bytes": need, "free_bytes": limit,
                        "limit_bytes": limit, "usable_bytes": most, "idle_bytes": idle, "idle_usable_bytes": idle_most}
        for device, need in est.per_device.items():
            if device != "host" and device not in self.gov.accelerators:
                continue  # unknown device: the backend refuses it with its own words
            free = self.gov.free(device, exclude=exclude) + sum(
                m.memory.committed_on(device) for m in self.gov.models() if m.name in evicted)
            if need > free:
                return {"device": device, "reason": "device_budget", "needed_bytes": need, "free_bytes": max(0, free),
                        "limit_bytes": self.gov.budget(device)["limit_bytes"],
                        "lastmile_own_bytes": self.gov.own_bytes if device == "host" else 0}
        return None

    def _idle_lru(self, exclude: str) -> list[Any]:
        idle = []
        for m in self.gov.models():
            stats = m.batcher.stats() if m.batcher else {}
            if m.name != exclude and m.state == "ready" and not stats.get("queue_depth") and not stats.get("in_flight"):
                idle.append(m)
        return sorted(idle, key=lambda m: m.last_used)

    def options(self, manifest: Manifest, settings: ModelSettings, backend: str) -> list[dict[str, Any]]:
        """Variants of the load that would fit now, best first: evicting idle models (nothing
        about the model changes), a smaller max batch, ZeRO offload (accelerators), lower
        precision; then advice that changes what the operator set (a larger
        ``memory_limit_mb``, a larger host budget). Each: ``{option, settings|evict|memory,
        estimate_bytes, description}``."""
        gov = self.gov
        name = manifest.name
        limit = settings.memory_limit_mb
        out: list[dict[str, Any]] = []
        est = self.estimate(manifest, settings, backend)
        victims: list[str] = []
        for m in self._idle_lru(name):
            victims.append(m.name)
            if self.shortfall(est, limit, name, victims) is None:
                out.append({"option": "evict_idle", "evict": list(victims), "settings": {},
                            "estimate_bytes": est.total_bytes,
                            "description": f"unload idle model(s) {', '.join(victims)} (least recently used first)"})
                break
        if is_generation_manifest(manifest):
            return out + self._generation_options(manifest, settings, backend, est) + self._advice(manifest, settings, backend, est)
        batch = settings.max_batch_size
        best = None
        low, high = 1, batch - 1
        while low <= high:
            mid = (low + high) // 2
            if self.shortfall(self.estimate(manifest, settings.overlay({"max_batch_size": mid}), backend), limit, name) is None:
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
            if self.shortfall(e, limit, name) is None:
                out.append({"option": "zero_offload", "settings": {"offload": "cpu"}, "estimate_bytes": e.total_bytes,
                            "description": "ZeRO-Inference: parameters offloaded to host memory"})
        if settings.dtype == "fp32":
            lower = "fp16" if backend == "onnxruntime" or device != "host" else "bf16"
            e = self.estimate(manifest, settings.overlay({"dtype": lower}), backend)
            if self.shortfall(e, limit, name) is None:
                out.append({"option": "lower_precision", "settings": {"dtype": lower}, "estimate_bytes": e.total_bytes,
                            "description": f"dtype {lower} instead of fp32 (half the weight memory)"})
            elif best is None:
                for size in (batch // 2, batch // 4, 1):
                    if size < 1:
                        continue
                    e = self.estimate(manifest, settings.overlay({"dtype": lower, "max_batch_size": size}), backend)
                    if self.shortfall(e, limit, name) is None:
                        out.append({"option": "lower_precision_smaller_batch",
                                    "settings": {"dtype": lower, "max_batch_size": size}, "estimate_bytes": e.total_bytes,
                                    "description": f"dtype {lower} and max_batch_size {size}"})
                        break
        out.extend(self._advice(manifest, settings, backend, est))
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
            if self.shortfall(e, settings.memory_limit_mb, manifest.name) is None:
                kinds.add(kind)
                freed = est.total_bytes - e.total_bytes
                out.append({"option": f"generation_{kind}", "settings": changes, "estimate_bytes": e.total_bytes,
                            "description": f"{description} frees {freed / MiB:.0f} MiB"})
        return out

    def _advice(self, manifest: Manifest, settings: ModelSettings, backend: str, est: Estimate) -> list[dict[str, Any]]:
        """A larger ``memory_limit_mb`` (when the model's own limit is what stops it and the
        budget has room for the larger one), or a larger host budget (when lastmile's own
        processes and the other models leave too little)."""
        out: list[dict[str, Any]] = []
        name = manifest.name
        if settings.memory_limit_mb:
            need_mb = self.needed_limit_mb(est)
            if need_mb > settings.memory_limit_mb:
                e = self.estimate(manifest, settings.overlay({"memory_limit_mb": need_mb}), backend)
                if self.shortfall(e, need_mb, name) is None:
                    out.append({"option": "raise_limit", "settings": {"memory_limit_mb": need_mb}, "estimate_bytes": e.total_bytes,
                                "description": f"memory_limit_mb {need_mb} instead of {settings.memory_limit_mb} (the estimate "
                                               f"{human(e.total_bytes)} under the {self.gov.config['high_watermark']:.0%} watermark"
                                               + (", with headroom: not measured on this artifact yet)" if est.source == "static" else ")")})
        host_need = est.per_device.get("host", 0)
        free = self.gov.free("host", exclude=name)
        if host_need > free:
            budget = self.gov.budget("host")["limit_bytes"]
            raise_to = int(math.ceil((budget + host_need - free) / MiB)) + ADVICE_MARGIN_MIB
            if raise_to * MiB < self.gov.budget("host")["total_bytes"]:
                out.append({"option": "raise_budget", "memory": {"host_limit_mb": raise_to}, "settings": {},
                            "estimate_bytes": est.total_bytes,
                            "description": f"memory.host_limit_mb {raise_to} (lastmile's own processes use "
                                           f"{human(self.gov.own_bytes)} of the {human(budget)} host budget; "
                                           f"`lastmile memory set --host-limit-mb {raise_to}`)"})
        return out

    def dry_run(self, manifest: Manifest, settings: ModelSettings, backend: str) -> dict[str, Any]:
        """What a load would need and whether it fits now, without starting anything."""
        gov = self.gov
        est = self.estimate(manifest, settings, backend)
        short = self.shortfall(est, settings.memory_limit_mb, manifest.name)
        out = {
            "model": manifest.name,
            "fits": short is None,
            "estimate": est.as_dict(),
            "free_bytes": {d: max(0, gov.free(d, exclude=manifest.name)) for d in est.per_device if d == "host" or d in gov.accelerators},
            "plan": gov.config["plan"],
            "evict_idle": gov.config["evict_idle"],
        }
        if short is not None:
            out["shortfall"] = short
            out["options"] = self.options(manifest, settings, backend)
        return out

    def refusal(self, name: str, short: dict[str, Any], est: Estimate, options: list[dict[str, Any]],
                measured: bool = False) -> InsufficientMemory:
        """The 507 for ``short`` (and its ``load_refused`` event)."""
        gov = self.gov
        need, free = short["needed_bytes"], short["free_bytes"]
        if short["reason"] == "model_limit":
            what = "idle runner" if measured else "estimate"
            message = (f"model {name!r}: its {what} needs {human(need)} on {short['device']}, too close to its memory_limit_mb "
                       f"({human(short['limit_bytes'])}): an admitted model stays under {gov.config['high_watermark']:.0%} of its "
                       f"limit ({human(short['usable_bytes'])}) and idles under {gov.config['low_watermark']:.0%} "
                       f"({human(short['idle_usable_bytes'])}, needed {human(short['idle_bytes'])})")
        else:
            message = (f"model {name!r} needs an estimated {human(need)} on {short['device']}, more than the free "
                       f"{short['device']} budget ({human(free)} free of {human(short['limit_bytes'])}")
            if short["device"] == "host":
                message += f"; lastmile's own processes use {human(short.get('lastmile_own_bytes'))}"
            message += ")"
        if options:
            message += "; would fit: " + "; ".join(o["description"] for o in options)
        else:
            message += "; no smaller variant fits"
        if any(o["option"] not in ("evict_idle", *ADVICE) for o in options) and gov.config["plan"] != "auto":
            message += " (or set memory.plan = \"auto\")"
        if any(o["option"] == "evict_idle" for o in options) and not gov.config["evict_idle"]:
            message += " (or set memory.evict_idle = true)"
        gov.events.record("load_refused", message, model=name, level="warning", needed_bytes=need, free_bytes=free,
                          limit_bytes=short["limit_bytes"], device=short["device"], options=options)
        return InsufficientMemory(message, {"model": name, **short, "estimate": est.as_dict(), "options": options})

    async def admit(self, manifest: Manifest, settings: ModelSettings, backend: str) -> tuple[ModelSettings, Estimate, dict[str, Any] | None]:
        """Settings to load with (possibly changed by ``plan = "auto"``), the estimate, and the
        plan taken (None when the request fitted as asked). Evicts idle models when
        ``evict_idle`` is on and that makes room. Raises :class:`InsufficientMemory`."""
        gov = self.gov
        name = manifest.name
        est = self.estimate(manifest, settings, backend)
        short = self.shortfall(est, settings.memory_limit_mb, name)
        if short is None:
            return settings, est, None
        options = self.options(manifest, settings, backend)
        chosen = None
        for option in options:
            if option["option"] == "evict_idle":
                if gov.config["evict_idle"]:
                    chosen = option
                    break
            elif gov.config["plan"] == "auto" and option["option"] not in ADVICE:
                chosen = option
                break
        if chosen is None:
            raise self.refusal(name, short, est, options)
        if chosen["option"] == "evict_idle":
            host = gov.host
            for victim in chosen["evict"]:
                loaded = host.models.get(victim) if host else None
                gov.events.record("memory_evict", f"unloading idle model {victim} to make room for {name}", model=victim,
                                  for_model=name, freed_bytes=loaded.memory.committed_on("host") if loaded else None)
                if host is not None:
                    await host.unload(victim, reason=f"evicted (idle, least recently used) to make room for {name}")
            return settings, est, chosen
        new_settings = settings.overlay(chosen["settings"])
        new_est = self.estimate(manifest, new_settings, backend)
        gov.events.record("memory_plan", f"{name} does not fit as asked; plan auto took: {chosen['description']}",
                          model=name, option=chosen["option"], settings=chosen["settings"], needed_bytes=est.total_bytes,
                          estimate_bytes=new_est.total_bytes, free_bytes=short["free_bytes"])
        return new_settings, new_est, chosen
