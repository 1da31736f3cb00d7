"""What the governor knows about one loaded model (``LoadedModel.memory``), shown under
``memory`` in ``/lm/v1/models`` and ``/lm/v1/memory``. Every figure is bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lastmile.runtime.memory.estimate import Estimate

LADDER_STEPS = ("none", "shrink", "lower_batch", "shed", "restart")
USED_MEASURE = "uss+pool"  # what used_bytes is: the runners' USS (as the hard cap holds it) + pool segments


@dataclass
class ModelMemory:
    device: str = "host"  # the budget its main usage counts against
    estimate: Estimate | None = None
    limit_bytes: int | None = None
    uss_bytes: int = 0
    rss_bytes: int = 0
    vm_bytes: int = 0
    pool_bytes: int = 0
    device_bytes: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    ready_bytes: int | None = None  # used at the first full sample after "ready"
    sampled_at: float | None = None
    ladder_step: int = 0  # index into LADDER_STEPS
    effective_max_batch: int | None = None
    effective_slots: int | None = None  # a generation model's max_num_seqs under the ladder
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
    footprint_key: str | None = None  # the artifact's measured-footprint record (see footprints.py)
    recorded: dict[str, Any] | None = None  # that record as it was when the model loaded

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
            "used_measure": USED_MEASURE if self.device == "host" else "device_reserved",
            "estimate_bytes": est,
            "estimate_source": self.estimate.source if self.estimate else None,
            "estimate_error": (round((used - est) / est, 4) if est and self.sampled_at else None),
            "peak_estimate_error": (round((self.peak_bytes - est) / est, 4) if est and self.sampled_at else None),
            "limit_bytes": self.limit_bytes,
            "uss_bytes": self.uss_bytes,
            "rss_bytes": self.rss_bytes,
            "vm_bytes": self.vm_bytes,
            "pool_bytes": self.pool_bytes,
            "device_bytes": dict(self.device_bytes),
            "peak_bytes": self.peak_bytes,
            "ready_bytes": self.ready_bytes,
            "sampled_at": self.sampled_at,
            # step 2 is "fewer_slots" for a generation model (its sequences, not its batch, shrink)
            "ladder_step": "fewer_slots" if self.ladder_step == 2 and self.effective_slots else LADDER_STEPS[self.ladder_step],
            "effective_max_batch_size": self.effective_max_batch,
            "effective_max_num_seqs": self.effective_slots,
            "shedding": self.shedding,
            "memory_restarts": self.memory_restarts,
            "cap_hits": self.cap_hits,
            "hard_cap": self.cap or None,
            "plan_taken": self.plan_taken,
            "footprint_record": self.recorded,
            "estimate": self.estimate.as_dict() if self.estimate else None,
        }
