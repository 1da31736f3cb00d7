"""``GET /lm/v1/monitor``: the live monitoring stream (a WebSocket) the TUI's dashboard draws from.

One JSON snapshot per tick, at the rate the client asks for (``?rate_hz=``, 0.1..20, default 1;
a running client may send ``{"rate_hz": x}`` to change it without reconnecting). Each snapshot
carries host CPU and RAM (psutil), per-accelerator figures where the host can report them, the
daemon summary, one row per loaded model (its ``describe()`` plus requests/s from counter deltas
and the resident memory of its runner processes) and the events recorded since the previous
snapshot. ``?since=N`` resumes the event stream after a reconnect.

Why a push stream rather than the TUI polling ``/lm/v1/models``: one connection, deltas computed
where the counters live (requests/s is exact, not two polls' guess), and events arrive with
the figures they explain. The stream ends by itself when the daemon stops (close code 1001),
so a graceful stop never waits on idle monitors.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import time
from typing import Any

import psutil
from aiohttp import WSMsgType, web

from lastmile.appliance.server.daemon import Daemon
from lastmile.appliance.server.http import ApiError
from lastmile.appliance.server.routes_generate import GENERATION_METRICS

logger = logging.getLogger("lastmile.monitor")

routes = web.RouteTableDef()

MIN_RATE_HZ, MAX_RATE_HZ, DEFAULT_RATE_HZ = 0.1, 20.0, 1.0
FIRST_EVENTS = 200  # history sent with the first snapshot of a fresh connection
EVENTS_PER_TICK = 500
STOP_POLL_S = 0.1  # how often a sleeping stream checks that the daemon is stopping


def parse_rate(value: Any, field: str = "rate_hz") -> float:
    """A rate in Hz within the allowed range, or :class:`ApiError` 400 naming ``field``."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{field} must be a number of snapshots per second from {MIN_RATE_HZ} to {MAX_RATE_HZ}; got {value!r}", field=field) from None
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:  # also refuses nan and inf
        raise ApiError(400, f"{field} must be from {MIN_RATE_HZ} to {MAX_RATE_HZ} snapshots per second; got {value!r}", field=field)
    return rate


class _CpuMeter:
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


ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/davinci[0-9]*", "/dev/accel/accel[0-9]*")


def host_may_have_accelerators() -> bool:
    """A device node of a GPU/NPU driver exists. Without one there is nothing to probe, and the
    daemon is spared importing torch and DeepSpeed (seconds of CPU, 100+ MB) for the monitor."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


class _Accelerators:
    """Per-accelerator utilisation and memory. The device list comes from the daemon's host
    facts (torch/DeepSpeed probing, done once in a thread, only on a host with accelerator
    device nodes); live figures come from NVML when ``pynvml`` is installed (it needs no CUDA
    context in the daemon). CPU-only host: ``[]``."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._facts_task: asyncio.Task | None = None
        cached = getattr(daemon, "_system", None)
        self._devices: list[dict[str, Any]] | None = None if cached is not None or host_may_have_accelerators() else []

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

    def __init__(self, daemon: Daemon, since: int, generation: Any = None) -> None:
        self.daemon = daemon
        self.generation = generation  # GenerationMetrics of the generation routes (issue 15), if any
        self._last_tokens: dict[str, tuple[int, int]] = {}
        self.seq = 0
        self.event_seq = since
        self.cpu = _CpuMeter()
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

    def _generation_rates(self, name: str, dt: float | None) -> dict[str, Any]:
        """Tokens/s from the generation routes' counters (deltas, like requests/s), TTFT and
        inter-token percentiles over their recent window."""
        window = self.generation.window(name)
        totals = (window["prompt_tokens_total"], window["generated_tokens_total"])
        previous = self._last_tokens.get(name)
        self._last_tokens[name] = totals
        rates = (0.0, 0.0)
        if dt and dt > 0 and previous is not None:
            rates = tuple(round(max(0, t - p) / dt, 2) for t, p in zip(totals, previous))
        return {**window, "prompt_tokens_per_s": rates[0], "generated_tokens_per_s": rates[1]}

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
            if self.generation is not None and "generation" in row:
                row["generation"] = {**row["generation"], "api": self._generation_rates(name, dt)}
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
        governor = getattr(self.daemon.manager, "governor", None)  # the memory-pool manager (issue 4)
        if governor is not None:
            try:
                snapshot["memory"] = governor.snapshot()
            except Exception as exc:  # noqa: BLE001 - figures missing for one tick, never a dead stream
                snapshot["memory"] = {"error": f"{type(exc).__name__}: {exc}"}
        self.seq += 1
        return snapshot


@routes.get("/lm/v1/monitor")
async def monitor(request: web.Request) -> web.StreamResponse:
    daemon: Daemon = request.app["daemon"]
    rate = parse_rate(request.query.get("rate_hz", DEFAULT_RATE_HZ))
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        raise ApiError(400, f"since must be an integer event seq; got {request.query.get('since')!r}", field="since") from None
    ws = web.WebSocketResponse(heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "GET /lm/v1/monitor is a WebSocket: connect with an 'Upgrade: websocket' request (rate_hz, since)", field="Upgrade")
    await ws.prepare(request)
    state = {"rate_hz": rate}
    wake = asyncio.Event()
    reader = asyncio.get_running_loop().create_task(_read_commands(ws, state, wake))
    builder = SnapshotBuilder(daemon, since, request.app.get(GENERATION_METRICS))
    try:
        while not ws.closed and not reader.done():
            started = time.monotonic()
            snapshot = await builder.build(state["rate_hz"])
            await ws.send_str(json.dumps(snapshot, default=str))
            deadline = started + 1.0 / state["rate_hz"]
            while not ws.closed and not reader.done():
                if daemon.status == "stopping":
                    await ws.close(code=1001, message=b"daemon stopping")
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(left, STOP_POLL_S))
                if wake.is_set():  # a new rate: the next tick is due one new period after the last
                    deadline = started + 1.0 / state["rate_hz"]
    except ConnectionResetError:
        pass  # the client went away between two ticks
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        if not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
    return ws


async def _read_commands(ws: web.WebSocketResponse, state: dict[str, float], wake: asyncio.Event) -> None:
    """Client messages: ``{"rate_hz": x}`` changes the rate; anything wrong gets an error frame."""
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            body = json.loads(msg.data)
            if not isinstance(body, dict) or "rate_hz" not in body:
                raise ApiError(400, 'messages must be JSON objects like {"rate_hz": 2}', field="rate_hz")
            state["rate_hz"] = parse_rate(body["rate_hz"])
            wake.set()
        except (ValueError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else f"message is not JSON: {exc}"
            await ws.send_str(json.dumps({"type": "error", "error": message, "field": "rate_hz"}))
