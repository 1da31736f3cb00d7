"""One monitor stream's snapshots: host CPU and RAM (psutil), per-accelerator figures where the
host can report them, the daemon summary, one row per loaded model (its ``describe()`` plus
requests/s from counter deltas and the resident memory of its runner processes), the memory
governor's view and the events recorded since the previous snapshot.

The route (``routes_monitor``) owns the WebSocket and the tick rate; this module owns what a
tick says, so the figures are computed where the counters live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psutil

from lastmile.appliance.server.daemon import Daemon
from lastmile.runtime.accelerators import device_nodes

logger = logging.getLogger("lastmile.monitor")

FIRST_EVENTS = 200  # history sent with the first snapshot of a fresh connection
EVENTS_PER_TICK = 500


class _HostCpuPercent:
    """Host CPU % between two calls, per stream (``psutil.cpu_percent`` keeps one global last
    sample, so two monitors would halve each other's interval)."""

    def __init__(self) -> None:
        self._last = psutil.cpu_times()

    def percent(self) -> float:
        now = psutil.cpu_times()
        total = sum(now) - sum(self._last)
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (self._last.idle + getattr(self._last, "iowait", 0.0))
        self._last = now
        return round(max(0.0, min(100.0, 100.0 * (1.0 - idle / total))), 1) if total > 0 else 0.0


def _rss(pids: list[int]) -> int | None:
    """Resident memory of the runner processes (None when none could be read)."""
    total, seen = 0, False
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
            seen = True
        except (psutil.Error, ValueError):
            continue
    return total if seen else None


class _Accelerators:
    """Per-accelerator utilisation and memory. The device list comes from the daemon's host
    facts (torch/DeepSpeed probing, done once in a thread, only on a host with accelerator
    device nodes); live figures come from NVML when ``pynvml`` is installed (it needs no CUDA
    context in the daemon). CPU-only host: ``[]``."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._facts_task: asyncio.Task | None = None
        cached = getattr(daemon, "_system", None)
        # no accelerator device node: nothing to probe, and torch/DeepSpeed are never imported for the monitor
        self._devices: list[dict[str, Any]] | None = None if cached is not None or device_nodes() else []

    def _device_list(self) -> list[dict[str, Any]] | None:
        if self._devices is not None:
            return self._devices
        if self._facts_task is None:
            self._facts_task = asyncio.get_running_loop().create_task(self._daemon.system_facts())
        if not self._facts_task.done():
            return None
        devices: list[dict[str, Any]] = []
        try:
            facts = self._facts_task.result()
            ds = facts.get("accelerators", {}).get("deepspeed", {})
            totals = {d.get("device"): d for d in ds.get("devices", [])}
            for name in facts.get("accelerators", {}).get("devices", []):
                if name == "cpu":
                    continue
                known = totals.get(name, {})
                devices.append({"device": name, "name": known.get("name"), "memory_total_bytes": known.get("total_memory_bytes")})
        except Exception as exc:  # noqa: BLE001 - a failed probe means "no figures", never a dead stream
            logger.warning("accelerator facts unavailable for the monitor: %s", exc)
        self._devices = devices
        return devices

    async def sample(self) -> list[dict[str, Any]]:
        devices = self._device_list()
        if not devices:
            return []
        if not any(d["device"].startswith("cuda") for d in devices):
            return [{**d, "utilization_percent": None, "memory_used_bytes": None} for d in devices]
        return await asyncio.get_running_loop().run_in_executor(None, _nvml_sample, devices)


def _nvml_sample(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: list the devices without live figures
        return [{**d, "utilization_percent": None, "memory_used_bytes": None} for d in devices]
    out = []
    for d in devices:
        entry = {**d, "utilization_percent": None, "memory_used_bytes": None}
        kind, _, index = d["device"].partition(":")
        if kind == "cuda":
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(index or 0))
                entry["utilization_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                entry["memory_used_bytes"], entry["memory_total_bytes"] = int(mem.used), int(mem.total)
            except Exception:  # noqa: BLE001
                pass
        out.append(entry)
    return out


class SnapshotBuilder:
    """Builds one stream's snapshots; keeps the counters of the previous one for rates."""

    def __init__(self, daemon: Daemon, since: int) -> None:
        self.daemon = daemon
        self.seq = 0
        self.event_seq = since
        self.cpu = _HostCpuPercent()
        self.accelerators = _Accelerators(daemon)
        self._last_time: float | None = None
        self._last_counts: dict[str, tuple[int, int]] = {}
        self._process = psutil.Process()

    def _events(self) -> list[dict[str, Any]]:
        log = self.daemon.events
        latest = log.since(0, 1)
        if latest and latest[-1]["seq"] < self.event_seq:
            self.event_seq = 0  # a restarted daemon numbers its events from 1 again
        if self.seq == 0 and self.event_seq == 0:
            events = log.since(0, FIRST_EVENTS)
        else:
            events = log.since(self.event_seq, EVENTS_PER_TICK)
        if events:
            self.event_seq = events[-1]["seq"]
        return events

    async def build(self, rate_hz: float) -> dict[str, Any]:
        now = time.monotonic()
        dt = (now - self._last_time) if self._last_time is not None else None
        rows, counts = [], {}
        for name, model in list(self.daemon.manager.models.items()):
            row = model.describe()
            counts[name] = (row["requests"], row["failures"])
            previous = self._last_counts.get(name)
            if dt and previous is not None and dt > 0:
                row["requests_per_s"] = round(max(0, row["requests"] - previous[0]) / dt, 3)
                row["failures_per_s"] = round(max(0, row["failures"] - previous[1]) / dt, 3)
            else:
                row["requests_per_s"] = row["failures_per_s"] = 0.0
            row["rss_bytes"] = _rss([r["pid"] for r in row["runners"] if r.get("pid")])
            row["memory_limit_mb"] = row["settings"].get("memory_limit_mb")
            row["avg_batch_size"] = row.get("batcher", {}).get("avg_batch_size", 0.0)
            # one activity figure per row whatever the model is: tensor models requests/s and
            # the request p50; generation models tokens/s and the inter-token p50 (the
            # generation routes' annotator replaces these with the figures they observe)
            gen = row.get("generation")
            if isinstance(gen, dict):
                row["rate_per_s"], row["rate_unit"] = gen.get("tokens_per_s") or 0.0, "tokens/s"
                row["p50_ms"], row["p50_of"] = gen.get("inter_token_p50_ms"), "inter_token"
                row["avg_batch_size"] = float(gen.get("running") or 0)  # sequences decoding together
            else:
                row["rate_per_s"], row["rate_unit"] = row["requests_per_s"], "requests/s"
                row["p50_ms"], row["p50_of"] = row["latency_ms"]["p50"], "request"
            rows.append(row)
        self._last_time, self._last_counts = now, counts
        vm = psutil.virtual_memory()
        snapshot: dict[str, Any] = {
            "type": "snapshot",
            "seq": self.seq,
            "time": time.time(),
            "rate_hz": rate_hz,
            "host": {
                "cpu_percent": self.cpu.percent(),
                "cpu_count": psutil.cpu_count(logical=True),
                "ram_total_bytes": int(vm.total),
                "ram_available_bytes": int(vm.available),
                "ram_used_bytes": int(vm.total - vm.available),
                "ram_percent": float(vm.percent),
                "daemon_rss_bytes": int(self._process.memory_info().rss),
            },
            "accelerators": await self.accelerators.sample(),
            "daemon": self.daemon.summary(),
            "models": rows,
            "events": self._events(),
        }
        governor = getattr(self.daemon.manager, "governor", None)  # the memory governor
        if governor is not None:
            try:
                snapshot["memory"] = governor.snapshot()
            except Exception as exc:  # noqa: BLE001 - figures missing for one tick, never a dead stream
                snapshot["memory"] = {"error": f"{type(exc).__name__}: {exc}"}
        self.seq += 1
        return snapshot
