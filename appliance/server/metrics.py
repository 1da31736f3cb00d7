"""Prometheus ``/metrics`` (prometheus-client, text format).

Two kinds of figures:

- **observed on the hot path** by the infer handler (:class:`InferMetrics`): requests by model
  and outcome, end-to-end latency, time queued, compute time and size of each batch. One
  observation is a dict lookup plus a few float adds (children are cached per model), so it
  costs ~2 µs a request.
- **read at scrape time** from the model manager and the memory governor
  (:class:`ManagerCollector`): queue depth, readiness, runner restarts, memory used and limit
  per model and device, the device budgets, shared-memory pool bytes, and mitigation steps
  and other events counted by kind from the event log (read incrementally with a cursor, so
  a scrape costs the events since the last one).

Names follow the Prometheus conventions: ``lastmile_`` prefix, base units in the name
(``_seconds``, ``_bytes``), counters end in ``_total``.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import TYPE_CHECKING, Any, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lastmile.appliance.server.daemon import Daemon

if TYPE_CHECKING:
    from lastmile.runtime.batcher import BatchInfo
    from lastmile.runtime.manager import LoadedModel

routes = web.RouteTableDef()

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
OUTCOMES = ("success", "bad_request", "not_found", "unavailable", "timeout", "too_large", "error")


def outcome_of(status: int) -> str:
    """The ``outcome`` label for an HTTP status of the infer route."""
    if status < 400:
        return "success"
    if status == 404:
        return "not_found"
    if status == 413:
        return "too_large"
    if status in (503, 507):
        return "unavailable"
    if status == 504:
        return "timeout"
    if status < 500:
        return "bad_request"
    return "error"


class InferMetrics:
    """What the infer handler observes; one instance per app (``app["infer_metrics"]``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("lastmile_requests", "inference requests by model and outcome",
                                ["model", "outcome"], registry=registry)
        self.latency = Histogram("lastmile_request_duration_seconds", "infer request time in the daemon (body read to response built)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("lastmile_queue_time_seconds", "time a request waited in the batcher before its batch started",
                               ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.compute = Histogram("lastmile_batch_compute_seconds", "time one batch took in the runner, IPC included",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch = Histogram("lastmile_batch_size", "rows per batch sent to a runner",
                               ["model"], buckets=BATCH_BUCKETS, registry=registry)
        self._children: dict[str, tuple[Any, ...]] = {}
        self._last_batch: dict[str, int] = {}

    def _for(self, model: str) -> tuple[Any, ...]:
        c = self._children.get(model)
        if c is None:
            c = self._children[model] = (self.requests.labels(model, "success"), self.latency.labels(model),
                                         self.queue.labels(model), self.compute.labels(model), self.batch.labels(model))
        return c

    def success(self, model: str, seconds: float, batch: BatchInfo) -> None:
        ok, latency, queue, compute, size = self._for(model)
        ok.inc()
        latency.observe(seconds)
        queue.observe(batch.queue_s)
        # every request of a batch reports it: count each batch once (ids only grow)
        if batch.batch_id != self._last_batch.get(model):
            self._last_batch[model] = batch.batch_id
            compute.observe(batch.compute_s)
            size.observe(batch.batch_size)

    def failure(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, outcome_of(status)).inc()
        self._for(model)[1].observe(seconds)


class ManagerCollector:
    """Figures read from the manager at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._event_seq = 0
        self._events: _Tally = _Tally()
        self._mitigations: _Tally = _Tally()

    def _read_events(self) -> None:
        events = self.daemon.events.since(self._event_seq, 2000)
        for e in events:
            self._events[(e["kind"], e["level"])] += 1
            if e["kind"] == "memory_mitigation":
                self._mitigations[(e["model"] or "", str((e.get("data") or {}).get("step", "")))] += 1
        if events:
            self._event_seq = events[-1]["seq"]

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        up = GaugeMetricFamily("lastmile_up", "1 while the daemon is ready to serve")
        up.add_metric([], 1.0 if daemon.ready else 0.0)
        yield up
        queue = GaugeMetricFamily("lastmile_queue_depth", "requests waiting in the model's batcher", labels=["model"])
        in_flight = GaugeMetricFamily("lastmile_batches_in_flight", "batches running in the model's runners", labels=["model"])
        restarts = CounterMetricFamily("lastmile_runner_restarts", "runner processes restarted (crash or memory)", labels=["model"])
        state = GaugeMetricFamily("lastmile_model_ready", "1 when the model serves", labels=["model"])
        pool = GaugeMetricFamily("lastmile_buffer_pool_bytes", "shared-memory buffer pool size", labels=["model"])
        used = GaugeMetricFamily("lastmile_model_memory_used_bytes", "memory the model's runners use, by device", labels=["model", "device"])
        limit = GaugeMetricFamily("lastmile_model_memory_limit_bytes", "the model's memory_limit_mb, by device", labels=["model", "device"])
        estimate = GaugeMetricFamily("lastmile_model_memory_estimate_bytes", "memory the admission estimate expected", labels=["model", "device"])
        rejected = CounterMetricFamily("lastmile_batcher_rejected", "requests refused by the batcher (queue full, too large)", labels=["model"])
        # what each model's runner reported it runs (its own report, not the requested settings)
        info = GaugeMetricFamily("lastmile_model_info", "1 per loaded model, labelled with what its runner runs "
                                 "(\"loading\" until the runner has reported)", labels=["model", "engine", "precision", "device", "dtype"])
        for name, model in list(daemon.manager.models.items()):
            runs = model.runs() if hasattr(model, "runs") else None
            if runs:
                info.add_metric([name, *(str(runs.get(k) or "") for k in ("engine", "precision", "device", "dtype"))], 1.0)
            else:
                info.add_metric([name, "loading", "", "", ""], 1.0)
            stats = model.batcher.stats() if model.batcher else {}
            queue.add_metric([name], stats.get("queue_depth", 0))
            in_flight.add_metric([name], stats.get("in_flight", 0))
            rejected.add_metric([name], stats.get("rejected", 0))
            restarts.add_metric([name], model.restarts)
            state.add_metric([name], 1.0 if model.state == "ready" else 0.0)
            p = model.pool.stats()
            pool.add_metric([name], p.get("bytes_in_use", 0) + p.get("bytes_idle", 0))
            mem = _memory_of(model)
            if mem:
                device = str(mem.get("device") or "host")
                if mem.get("used_bytes") is not None:
                    used.add_metric([name, device], mem["used_bytes"])
                for dev, nbytes in (mem.get("device_bytes") or {}).items():
                    if dev != device and nbytes is not None:
                        used.add_metric([name, str(dev)], nbytes)
                if mem.get("limit_bytes"):
                    limit.add_metric([name, device], mem["limit_bytes"])
                if mem.get("estimate_bytes"):
                    estimate.add_metric([name, device], mem["estimate_bytes"])
        yield from (queue, in_flight, rejected, restarts, state, pool, used, limit, estimate, info)
        yield from self._devices()
        self._read_events()
        steps = CounterMetricFamily("lastmile_mitigation_steps", "memory mitigation steps taken, by model and step", labels=["model", "step"])
        for (model_name, step), n in sorted(self._mitigations.items()):
            steps.add_metric([model_name, step], n)
        events = CounterMetricFamily("lastmile_events", "events recorded, by kind and level", labels=["kind", "level"])
        for (kind, level), n in sorted(self._events.items()):
            events.add_metric([kind, level], n)
        yield steps
        yield events

    def _devices(self) -> Iterator[Metric]:
        governor = getattr(self.daemon.manager, "governor", None)
        if governor is None:
            return
        try:
            snap = governor.snapshot()
        except Exception:  # noqa: BLE001 - a scrape must not fail on a governor hiccup
            return
        budget = GaugeMetricFamily("lastmile_memory_limit_bytes", "memory budget per device", labels=["device"])
        used = GaugeMetricFamily("lastmile_memory_used_bytes", "memory used per device (last sample)", labels=["device"])
        committed = GaugeMetricFamily("lastmile_memory_committed_bytes", "memory promised to loaded models per device", labels=["device"])
        for device, d in (snap.get("devices") or {}).items():
            if d.get("limit_bytes") is not None:
                budget.add_metric([device], d["limit_bytes"])
            if d.get("used_bytes") is not None:
                used.add_metric([device], d["used_bytes"])
            if d.get("committed_bytes") is not None:
                committed.add_metric([device], d["committed_bytes"])
        yield from (budget, used, committed)


def _memory_of(model: LoadedModel) -> dict[str, Any]:
    memory = getattr(model, "memory", None)
    if memory is None or not hasattr(memory, "as_dict"):
        return {}
    try:
        return memory.as_dict()
    except Exception:  # noqa: BLE001
        return {}


def setup_metrics(app: web.Application, daemon: Daemon) -> None:
    registry = CollectorRegistry()
    registry.register(ManagerCollector(daemon))
    app["metrics_registry"] = registry
    app["infer_metrics"] = InferMetrics(registry)
    app.add_routes(routes)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app["metrics_registry"]
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
