"""``lastmile tune NAME``: find the serving settings that give a loaded model the most
throughput within a latency SLO, by measuring, over the public API only.

The sweep, in two stages (a full grid would take minutes of reloads):

1. **batching** (changed live with ``PATCH /lm/v1/models/{name}``, no reload): every
   ``max_batch_size`` x ``max_delay_ms`` pair, each measured with closed-loop load;
2. **session** (each a reload with the best batching of stage 1): ``graph_fusion`` levels and
   intra-op ``threads``. A reload the memory governor refuses (over the limit) is a failed
   trial, not a failed tune: the sweep stays within the memory limit that way.

Each trial: throughput (rows/s), p50/p99 latency, errors, the batch size the daemon formed.
The best trial is the one with the most rows/s, no errors and p99 within
``latency_slo_ms`` (when given). With ``apply`` its settings are PATCHed, which the daemon
persists in its state file; without, the model's original settings are put back.

The load comes from :mod:`lastmile.appliance.client.loadgen` (a raw HTTP/1.1 client: the generator must cost
less than the server it measures). ``progress`` gets one dict per step, so the CLI prints
a table and the TUI's tune screen shows a live list.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from lastmile.appliance.client.api import LastmileClient
from lastmile.appliance.client.loadgen import Target
from lastmile.appliance.client.wording import load_command, settings_text
from lastmile.models import vocabulary

TuneProgress = Callable[[dict[str, Any]], None]  # one dict per step of the sweep (bench.run.Progress takes a line)
SWEPT_KEYS = ("max_batch_size", "max_delay_ms", "graph_fusion", "threads")
LIVE_KEYS = tuple(k for k in SWEPT_KEYS if k in vocabulary.LIVE_KEYS)  # stage 1: changed live
RELOAD_KEYS = tuple(vocabulary.needs_reload(SWEPT_KEYS))  # stage 2: one reload per trial


@dataclass
class Trial:
    settings: dict[str, Any]
    rows_per_s: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    avg_batch_size: float | None = None
    meets_slo: bool = False
    error: str | None = None


@dataclass
class TuneResult:
    model: str
    latency_slo_ms: float | None
    original: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    applied: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def sample_inputs(client: LastmileClient, name: str, input_data: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tune's request inputs: the operator's ``input_data`` file, or one row generated from
    the store listing's input spec (valid ranges included; see ``inputs``)."""
    from lastmile.appliance.client.inputs import load_input_data, random_inputs

    entry = next((e for e in (await client.models())["store"] if e["name"] == name), None)
    spec = (entry or {}).get("inputs") or (await client.metadata(name))["inputs"]
    return load_input_data(input_data, spec) if input_data else random_inputs(spec)


class TuneAborted(ValueError):
    """The sweep cannot measure anything (every request fails); the message says why, once."""


def target_for(client: LastmileClient) -> Target:
    """Where the load goes: the client's Unix socket, or its ``http://host:port`` with its token."""
    from urllib.parse import urlsplit

    if client.socket_path is not None:
        return Target(unix=str(client.socket_path))
    parts = urlsplit(client.base_url)
    if parts.scheme != "http":
        raise ValueError(f"the tuner's load generator speaks plain HTTP only; got {client.base_url} (tune over the Unix socket)")
    return Target(host=parts.hostname or "127.0.0.1", port=parts.port or 80, token=client.token)


def default_grid(current: dict[str, Any], cores: int) -> dict[str, list[Any]]:
    """Batch sizes around the current one (1 to 4x), delays 0-5 ms, every fusion level,
    threads 1 and the cores."""
    mbs = int(current.get("max_batch_size") or 8)
    sizes = sorted({1, max(1, mbs // 2), mbs, min(4096, mbs * 2), min(4096, mbs * 4)})
    return {
        "max_batch_size": sizes,
        "max_delay_ms": [0.0, 1.0, 2.0, 5.0],
        "graph_fusion": ["basic", "extended", "all"] if current.get("graph_fusion") != "off" else ["off", "basic", "extended", "all"],
        "threads": sorted({1, max(1, cores)}),
    }


class Tuner:
    def __init__(self, client: LastmileClient, name: str, *, target: Target | None = None, latency_slo_ms: float | None = None,
                 clients: int = 32, duration_s: float = 2.0, warmup_s: float = 0.3, grid: dict[str, list[Any]] | None = None,
                 progress: TuneProgress | None = None, input_data: str | None = None) -> None:
        if latency_slo_ms is not None and latency_slo_ms <= 0:
            raise ValueError(f"latency_slo_ms: got {latency_slo_ms}; must be > 0")
        if clients < 1:
            raise ValueError(f"clients: got {clients}; must be >= 1")
        if duration_s <= 0:
            raise ValueError(f"duration_s: got {duration_s}; must be > 0")
        unknown = set(grid or {}) - set(LIVE_KEYS) - set(RELOAD_KEYS)
        if unknown:
            raise ValueError(f"grid: unknown setting(s) {sorted(unknown)}; the tuner sweeps {', '.join(LIVE_KEYS + RELOAD_KEYS)}")
        self.client, self.name = client, name
        self.target = target if target is not None else target_for(client)
        self.slo, self.clients, self.duration_s, self.warmup_s = latency_slo_ms, clients, duration_s, warmup_s
        self.grid, self.input_data = grid, input_data
        self.progress = progress or (lambda event: None)

    async def _patch(self, settings: dict[str, Any]) -> dict[str, Any]:
        return await self.client.tune(self.name, settings)

    async def _measure(self, request: bytes, settings: dict[str, Any]) -> Trial:
        from lastmile.appliance.client.loadgen import closed_loop

        trial = Trial(settings=dict(settings))
        before = (await self.client.model(self.name)).get("batcher", {})
        result = await closed_loop(self.target, request, concurrency=self.clients, duration_s=self.duration_s,
                                   warmup_s=self.warmup_s)
        after = (await self.client.model(self.name)).get("batcher", {})
        batches = after.get("batches", 0) - before.get("batches", 0)
        trial.rows_per_s, trial.throughput_rps = result.rows_per_s, result.throughput_rps
        trial.p50_ms, trial.p99_ms, trial.errors = result.p50_ms, result.p99_ms, result.errors
        trial.avg_batch_size = round((after.get("rows", 0) - before.get("rows", 0)) / batches, 2) if batches > 0 else None
        if result.errors:
            trial.error = "; ".join(result.error_samples[:2]) or f"{result.errors} errors"
        trial.meets_slo = not result.errors and result.requests > 0 and (
            self.slo is None or (trial.p99_ms is not None and trial.p99_ms <= self.slo))
        return trial

    async def _probe(self, arrays: dict[str, np.ndarray], types: dict[str, str]) -> None:
        """One request before any trial: inputs the model refuses end the tune here, in one line."""
        from lastmile.appliance.client.api import ApiError

        try:
            await self.client.infer(self.name, arrays, types)
        except ApiError as exc:
            raise TuneAborted(f"the model refuses the tune's request: {exc.message}; give its inputs with "
                              "--input-data FILE.npz|.json") from None

    async def run(self, apply: bool = False) -> TuneResult:
        from lastmile.appliance.client.loadgen import http_request
        from lastmile.appliance.v2codec import encode_request

        started = time.monotonic()
        described = await self.client.model(self.name)
        if described.get("state") != "ready":
            raise ValueError(f"model {self.name!r} is {described.get('state')}; load it first")
        current = described["settings"]
        original = {k: current[k] for k in LIVE_KEYS + RELOAD_KEYS}
        arrays, types = await sample_inputs(self.client, self.name, self.input_data)
        await self._probe(arrays, types)
        body, headers = encode_request(arrays, types, binary=True)
        request = http_request(self.target, "POST", f"/v2/models/{self.name}/infer", body, headers)
        try:
            cores = int((await self.client.system()).get("cpu", {}).get("physical_cores") or 0)
        except Exception:  # noqa: BLE001 - /lm/v1/system is informative only
            cores = 0
        import os

        grid = self.grid or default_grid(current, cores or os.cpu_count() or 1)
        live = [(b, d) for b in grid.get("max_batch_size", [current["max_batch_size"]])
                for d in grid.get("max_delay_ms", [current["max_delay_ms"]])]
        reload = [("graph_fusion", f) for f in grid.get("graph_fusion", []) if f != current["graph_fusion"]]
        reload += [("threads", t) for t in grid.get("threads", []) if t != current["threads"]]
        total = len(live) + len(reload)
        result = TuneResult(self.name, self.slo, original)
        self.progress({"event": "start", "model": self.name, "total": total, "original": original, "slo_ms": self.slo})
        index = 0

        async def trial(settings: dict[str, Any], changes: dict[str, Any]) -> Trial:
            nonlocal index
            index += 1
            self.progress({"event": "trial_start", "index": index, "total": total, "settings": settings})
            try:
                await self._patch(changes)
                t = await self._measure(request, settings)
            except Exception as exc:  # noqa: BLE001 - a refused reload (memory) is a failed trial
                t = Trial(settings=dict(settings), error=str(exc))
            result.trials.append(t)
            self.progress({"event": "trial", "index": index, "total": total, "trial": asdict(t)})
            if t.errors and not t.rows_per_s:  # every request failed: more trials would only repeat it
                raise TuneAborted(f"every request of trial {index} failed: {t.error}; the sweep stops "
                                  "(check the model's inputs, or give real ones with --input-data FILE.npz|.json)")
            return t

        def best_of(trials: list[Trial]) -> Trial | None:
            ok = [t for t in trials if t.meets_slo]
            return max(ok, key=lambda t: t.rows_per_s) if ok else None

        base = dict(original)
        try:
            for b, d in live:
                await trial({**base, "max_batch_size": b, "max_delay_ms": d}, {"max_batch_size": b, "max_delay_ms": d})
            stage1 = best_of(result.trials) or max(result.trials, key=lambda t: t.rows_per_s)
            base.update({k: stage1.settings[k] for k in LIVE_KEYS})
            if reload:
                await self._patch({k: base[k] for k in LIVE_KEYS})
            undo: dict[str, Any] = {}
            for key, value in reload:
                # one reload per trial: this knob changed, the previous one put back
                await trial({**base, key: value}, {**undo, key: value, **{k: base[k] for k in LIVE_KEYS}})
                undo = {key: base[key]}
        finally:
            result.best = best_of(result.trials)
            final = dict(result.best.settings) if (apply and result.best) else original
            try:
                current = (await self.client.model(self.name))["settings"]
                changes = {k: v for k, v in final.items() if current.get(k) != v}
                if changes:
                    await self._patch(changes)
                result.applied = bool(apply and result.best)
            except Exception as exc:  # noqa: BLE001
                self.progress({"event": "restore_failed", "error": str(exc)})
            result.seconds = round(time.monotonic() - started, 2)
        self.progress({"event": "done", "best": asdict(result.best) if result.best else None, "applied": result.applied,
                       "seconds": result.seconds})
        return result


def format_table(result: TuneResult) -> str:
    lines = [f"{'#':>3} {'batch':>5} {'delay ms':>8} {'fusion':>8} {'threads':>7} {'rows/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'avg batch':>9}  slo"]
    for i, t in enumerate(result.trials, 1):
        s = t.settings
        mark = "*" if result.best is t else ""
        if t.error and not t.throughput_rps:
            lines.append(f"{i:>3} {s['max_batch_size']:>5} {s['max_delay_ms']:>8g} {s['graph_fusion']:>8} {s['threads']:>7}  failed: {t.error}")
            continue
        lines.append(f"{i:>3} {s['max_batch_size']:>5} {s['max_delay_ms']:>8g} {s['graph_fusion']:>8} {s['threads']:>7} "
                     f"{t.rows_per_s:>10.1f} {t.p50_ms or 0:>8.2f} {t.p99_ms or 0:>8.2f} {t.avg_batch_size or 0:>9}  "
                     f"{'yes' if t.meets_slo else 'no'}{mark}")
    if result.best:
        best = result.best.settings
        lines.append(f"best: {settings_text(best)} ({result.best.rows_per_s:.1f} rows/s, p99 {result.best.p99_ms} ms)"
                     + (" - applied and saved" if result.applied else f" - not applied (use --apply, or: {load_command(result.model, best)})"))
    else:
        lines.append("no setting met the SLO" if result.latency_slo_ms else "no trial succeeded")
    return "\n".join(lines)
