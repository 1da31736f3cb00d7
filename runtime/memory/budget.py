"""Budgets per device: ``host`` and each accelerator (``cuda:0``...), from ``[memory]``."""

from __future__ import annotations

import logging
from typing import Any

from lastmile.runtime.memory import cgroup, procfs
from lastmile.runtime.memory.units import mib

logger = logging.getLogger("lastmile.memory")


def accelerator_memory() -> dict[str, int]:
    """Total memory of each accelerator (``cuda:0`` -> bytes), asked only when device nodes
    exist (so a CPU-only daemon never imports torch for this)."""
    from lastmile.runtime.accelerators import detect, device_nodes

    if not device_nodes("cuda", "npu"):  # the kinds whose memory DeepSpeed's probe reports
        return {}
    try:
        devices = detect()["accelerators"]["deepspeed"].get("devices", [])
        return {d["device"]: int(d["total_memory_bytes"]) for d in devices if d.get("total_memory_bytes")}
    except Exception as exc:  # noqa: BLE001 - no device budgets rather than no daemon
        logger.warning("could not read accelerator memory: %s", exc)
        return {}


class Budgets:
    """What each device may hold. ``config`` is the governor's live ``[memory]`` dict (changed
    in place by ``PUT /lm/v1/memory``)."""

    def __init__(self, config: dict[str, Any], accelerators: dict[str, int] | None = None) -> None:
        self.config = config
        self._accelerators = accelerators
        self._host_total: int | None = None  # RAM does not change under a running daemon

    @property
    def accelerators(self) -> dict[str, int]:
        if self._accelerators is None:
            self._accelerators = accelerator_memory()
        return self._accelerators

    def host_total(self) -> int:
        """RAM, or the daemon's cgroup limit when that is lower (read each time: an operator
        can change ``MemoryMax=`` on a running unit)."""
        if self._host_total is None:
            self._host_total = procfs.meminfo()["total"]
        group = cgroup.read()
        return min(self._host_total, group.limit) if group else self._host_total

    @staticmethod
    def host_available() -> int:
        """What the OS can still give: ``MemAvailable``, capped by what the cgroup can take
        (its limit minus its usage that is not reclaimable page cache)."""
        available = procfs.meminfo()["available"]
        group = cgroup.read()
        return min(available, group.available) if group else available

    def budget(self, device: str) -> dict[str, Any]:
        """``total_bytes`` (what the device has), ``limit_bytes`` and where it came from."""
        cfg = self.config
        if device == "host":
            total = self.host_total()
            mb, fraction, key = cfg["host_limit_mb"], cfg["host_limit_fraction"], "host"
        else:
            total = self.accelerators.get(device, 0)
            mb, fraction, key = cfg["device_limit_mb"], cfg["device_limit_fraction"], "device"
        limit = mib(mb)
        if limit:
            return {"total_bytes": total, "limit_bytes": limit, "source": f"{key}_limit_mb"}
        return {"total_bytes": total, "limit_bytes": int(total * fraction), "source": f"{key}_limit_fraction"}

    def devices(self) -> list[str]:
        return ["host", *sorted(self.accelerators)]
