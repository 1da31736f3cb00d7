"""Prometheus ``/metrics``: figures read from the model manager at scrape time, so nothing is
counted twice and a scrape costs nothing between scrapes."""

from __future__ import annotations

from typing import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from appliance.daemon import Daemon

routes = web.RouteTableDef()


class ManagerCollector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        up = GaugeMetricFamily("lastmile_up", "1 while the daemon is ready to serve")
        up.add_metric([], 1.0 if daemon.ready else 0.0)
        yield up
        requests = CounterMetricFamily("lastmile_requests", "inference requests by model and outcome", labels=["model", "outcome"])
        queue = GaugeMetricFamily("lastmile_queue_depth", "requests waiting in the model's batcher", labels=["model"])
        restarts = CounterMetricFamily("lastmile_runner_restarts", "runner processes restarted after dying", labels=["model"])
        state = GaugeMetricFamily("lastmile_model_ready", "1 when the model serves", labels=["model"])
        pool = GaugeMetricFamily("lastmile_buffer_pool_bytes", "shared-memory buffer pool size", labels=["model"])
        for name, model in daemon.manager.models.items():
            requests.add_metric([name, "success"], model.requests - model.failures)
            requests.add_metric([name, "failure"], model.failures)
            queue.add_metric([name], model.batcher.stats().get("queue_depth", 0) if model.batcher else 0)
            restarts.add_metric([name], model.restarts)
            state.add_metric([name], 1.0 if model.state == "ready" else 0.0)
            stats = model.pool.stats()
            pool.add_metric([name], stats.get("bytes_in_use", 0) + stats.get("bytes_idle", 0))
        yield from (requests, queue, restarts, state, pool)


def setup_metrics(app: web.Application, daemon: Daemon) -> None:
    registry = CollectorRegistry()
    registry.register(ManagerCollector(daemon))
    app["metrics_registry"] = registry
    app.add_routes(routes)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app["metrics_registry"]
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
