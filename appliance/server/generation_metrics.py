"""Generation figures per model: what clients experience (observed by the generation routes)
and what the engine holds (read from the model's ``describe()["generation"]`` at scrape time).

- Observed on the hot path, per stream: time to first token (request received -> first token
  leaves the daemon), the gap between consecutive token chunks (inter-token latency), prompt
  and generated tokens, requests by outcome. Measured in the daemon rather than taken from the
  engine so that they include everything a client waits for (the runner pipe, the daemon's
  event loop, SSE encoding); the engine's own figures, when it reports them, appear beside.
- Read at scrape time: running and waiting sequences, KV cache used vs reserved, slots and
  context (gauges; the engine's dict, missing keys skipped).

The figures a gateway or a dashboard made for vLLM reads are also exported under vLLM's
names with its ``model_name`` label (:data:`VLLM_NAMES`; docs/kubernetes.md): the Gateway API
Inference Extension's model-server protocol scrapes ``vllm:num_requests_waiting``,
``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc`` (a fraction, 0..1: KV bytes
holding tokens over KV bytes reserved), and vLLM's dashboards plot
``vllm:time_to_first_token_seconds`` and ``vllm:inter_token_latency_seconds`` (observed from
the streams the daemon sends, like Lastmile's own histograms).

Prometheus gets histograms and counters (tokens/s is ``rate(lastmile_generation_tokens_total)``);
the monitor stream gets tokens/s from counter deltas and TTFT / inter-token p50 and p99 over a
recent window (:meth:`GenerationMetrics.window`), so the TUI needs no PromQL.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
WINDOW = 1024  # recent samples kept per model for the monitor's percentiles
RATE_WINDOW_S = 5.0  # tokens/s and streams/s: over the last this many seconds
RATE_BUCKET_S = 0.25  # counts are summed per bucket of this many seconds (bounded memory)
ENGINE_GAUGES = (
    ("running", "lastmile_generation_running", "sequences decoding in the model's runner"),
    ("waiting", "lastmile_generation_waiting", "sequences admitted but waiting for a slot"),
    ("kv_used_bytes", "lastmile_generation_kv_used_bytes", "KV cache bytes holding tokens now"),
    ("kv_reserved_bytes", "lastmile_generation_kv_reserved_bytes", "KV cache bytes reserved (slots x context x KV bytes per token)"),
    ("max_num_seqs", "lastmile_generation_slots", "sequence slots (max_num_seqs)"),
    ("max_context", "lastmile_generation_max_context_tokens", "tokens one sequence may hold (prompt + generated)"),
)


#: Lastmile's figure -> the vLLM metric exported beside it (label ``model_name``).
VLLM_NAMES = {
    "waiting": "vllm:num_requests_waiting",
    "running": "vllm:num_requests_running",
    "kv_usage": "vllm:kv_cache_usage_perc",
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
}


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


@dataclass
class _ModelStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    requests: int = 0
    active: int = 0
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    itl_s: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    tokens: "_Rate" = field(default_factory=lambda: _Rate())
    streams: "_Rate" = field(default_factory=lambda: _Rate())


class _Rate:
    """Events per second over the last :data:`RATE_WINDOW_S` (clock: ``time.perf_counter``,
    the one the generation routes stamp chunks with), summed in buckets of
    :data:`RATE_BUCKET_S`, so it costs a few entries however many tokens flow."""

    __slots__ = ("buckets", "first")

    def __init__(self) -> None:
        self.buckets: deque = deque(maxlen=int(RATE_WINDOW_S / RATE_BUCKET_S) + 2)  # [bucket index, count]
        self.first: float | None = None

    def add(self, now: float, n: int) -> None:
        if self.first is None:
            self.first = now
        index = int(now / RATE_BUCKET_S)
        if self.buckets and self.buckets[-1][0] == index:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([index, n])

    def per_s(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        if self.first is None:
            return 0.0
        start = now - RATE_WINDOW_S
        total = sum(n for index, n in self.buckets if (index + 1) * RATE_BUCKET_S > start)
        # a model serving for less than the window: divide by the time it has served
        span = max(RATE_BUCKET_S, min(RATE_WINDOW_S, now - self.first))
        return round(total / span, 2)


class GenerationMetrics:
    """One per app. ``stream(model)`` hands a route a :class:`StreamObserver` for one request."""

    def __init__(self, registry: CollectorRegistry | None, daemon: Any) -> None:
        self.daemon = daemon
        self._stats: dict[str, _ModelStats] = {}
        self._prom = registry is not None
        if registry is None:
            return
        self.requests = Counter("lastmile_generation_requests", "generation requests by model, API and outcome",
                                ["model", "api", "outcome"], registry=registry)
        self.ttft = Histogram("lastmile_generation_ttft_seconds", "time to first token: request received to first token sent",
                              ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("lastmile_generation_inter_token_seconds", "time between consecutive token chunks of a stream",
                             ["model"], buckets=ITL_BUCKETS, registry=registry)
        self.prompt = Counter("lastmile_generation_prompt_tokens", "prompt tokens of finished prefills", ["model"], registry=registry)
        self.generated = Counter("lastmile_generation_tokens", "tokens generated and sent", ["model"], registry=registry)
        # vLLM's names (VLLM_NAMES), observed from the same streams
        self.vllm_ttft = Histogram(VLLM_NAMES["ttft"], "time to first token in seconds (vLLM's name)", ["model_name"],
                                   buckets=TTFT_BUCKETS, registry=registry)
        self.vllm_itl = Histogram(VLLM_NAMES["itl"], "inter-token latency in seconds (vLLM's name)", ["model_name"],
                                  buckets=ITL_BUCKETS, registry=registry)
        registry.register(_EngineCollector(self))

    def stats(self, model: str) -> _ModelStats:
        s = self._stats.get(model)
        if s is None:
            s = self._stats[model] = _ModelStats()
        return s

    def stream(self, model: str, api: str, started: float) -> "StreamObserver":
        return StreamObserver(self, model, api, started)

    def outcome(self, model: str, api: str, outcome: str) -> None:
        if self._prom:
            self.requests.labels(model, api, outcome).inc()

    def window(self, model: str) -> dict[str, Any]:
        """The monitor's view of one model: totals (for deltas) and recent percentiles in ms."""
        s = self._stats.get(model)
        if s is None:
            return {"prompt_tokens_total": 0, "generated_tokens_total": 0, "requests_total": 0, "active_streams": 0,
                    "ttft_ms": {"p50": None, "p99": None}, "inter_token_ms": {"p50": None, "p99": None},
                    "tokens_per_s": 0.0, "streams_per_s": 0.0}
        ttft, itl = list(s.ttft_s), list(s.itl_s)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        return {
            "prompt_tokens_total": s.prompt_tokens,
            "generated_tokens_total": s.generated_tokens,
            "requests_total": s.requests,
            "active_streams": s.active,
            "ttft_ms": {"p50": ms(_pct(ttft, 0.5)), "p99": ms(_pct(ttft, 0.99))},
            "inter_token_ms": {"p50": ms(_pct(itl, 0.5)), "p99": ms(_pct(itl, 0.99))},
            "tokens_per_s": s.tokens.per_s(),
            "streams_per_s": s.streams.per_s(),
        }

    def live_fields(self, model: str, gen: dict[str, Any]) -> dict[str, Any]:
        """A generation model's ``generation`` dict with the figures clients see, flat under
        fixed names (the TUI, ``lastmile status`` and ``/lm/v1/models`` read these):

        ``tokens_per_s`` (generated tokens per second over the last :data:`RATE_WINDOW_S`),
        ``streams_per_s`` (streams started per second, same window), ``streams_active``,
        ``ttft_p50_ms``, ``ttft_p99_ms``, ``inter_token_p50_ms``, ``inter_token_p99_ms``
        (recent window; the engine's own figures where the daemon has seen no stream), next to
        the engine's ``engine``, ``precision``, ``running``, ``waiting``, ``kv_used_bytes``,
        ``kv_reserved_bytes``."""
        window = self.window(model)
        out = dict(gen)
        out["tokens_per_s"] = window["tokens_per_s"]
        out["streams_per_s"] = window["streams_per_s"]
        out["streams_active"] = window["active_streams"]
        for name in ("ttft", "inter_token"):
            for p in ("p50", "p99"):
                value = window[f"{name}_ms"][p]
                if value is not None:
                    out[f"{name}_{p}_ms"] = value
                else:
                    out.setdefault(f"{name}_{p}_ms", None)
        return out

    def annotate_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`live_fields` on each generation row of ``/lm/v1/models`` (in place)."""
        for row in rows:
            if isinstance(row.get("generation"), dict):
                row["generation"] = self.live_fields(row.get("name", ""), row["generation"])
        return rows


class StreamObserver:
    """Observes one generation: call :meth:`chunk` as each chunk leaves, :meth:`end` once."""

    __slots__ = ("m", "model", "api", "started", "last", "stats", "prompt_seen", "ended", "children")

    def __init__(self, metrics: GenerationMetrics, model: str, api: str, started: float) -> None:
        self.m, self.model, self.api, self.started = metrics, model, api, started
        self.last: float | None = None
        self.stats = metrics.stats(model)
        self.stats.active += 1
        self.stats.requests += 1
        self.stats.streams.add(started, 1)
        self.prompt_seen = False
        self.ended = False
        self.children = (metrics.ttft.labels(model), metrics.itl.labels(model), metrics.prompt.labels(model),
                         metrics.generated.labels(model), metrics.vllm_ttft.labels(model),
                         metrics.vllm_itl.labels(model)) if metrics._prom else None

    def chunk(self, now: float, prompt_tokens: int, new_tokens: int) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            self.stats.prompt_tokens += prompt_tokens
            if self.children:
                self.children[2].inc(prompt_tokens)
        if new_tokens <= 0:
            return
        self.stats.generated_tokens += new_tokens
        self.stats.tokens.add(now, new_tokens)
        if self.last is None:
            gap = now - self.started
            self.stats.ttft_s.append(gap)
            if self.children:
                self.children[0].observe(gap)
                self.children[4].observe(gap)
        else:
            gap = now - self.last
            self.stats.itl_s.append(gap)
            if self.children:
                self.children[1].observe(gap)
                self.children[5].observe(gap)
        self.last = now
        if self.children:
            self.children[3].inc(new_tokens)

    def end(self, outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.stats.active -= 1
        self.m.outcome(self.model, self.api, outcome)


class _EngineCollector:
    """Scrape-time gauges from each loaded generation model's ``describe()["generation"]``,
    plus the streams open in the daemon per model."""

    def __init__(self, metrics: GenerationMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families = {key: GaugeMetricFamily(name, text, labels=["model"]) for key, name, text in ENGINE_GAUGES}
        active = GaugeMetricFamily("lastmile_generation_streams_active", "generation requests open in the daemon", labels=["model"])
        vllm = {
            "waiting": GaugeMetricFamily(VLLM_NAMES["waiting"], "requests waiting to be processed (vLLM's name)", labels=["model_name"]),
            "running": GaugeMetricFamily(VLLM_NAMES["running"], "requests running on the engine (vLLM's name)", labels=["model_name"]),
            "kv_usage": GaugeMetricFamily(VLLM_NAMES["kv_usage"], "KV-cache usage, 1 means 100 percent (vLLM's name)",
                                          labels=["model_name"]),
        }
        manager = getattr(self.metrics.daemon, "manager", None)
        for name, model in list(getattr(manager, "models", {}).items()):
            try:
                gen = model.describe().get("generation")
            except Exception:  # noqa: BLE001 - a scrape must not fail on one model
                continue
            if not isinstance(gen, dict):
                continue
            for key, family in families.items():
                value = gen.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([name], value)
            active.add_metric([name], self.metrics.stats(name).active)
            for key in ("waiting", "running"):
                value = gen.get(key)
                vllm[key].add_metric([name], value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0)
            used, reserved = gen.get("kv_used_bytes"), gen.get("kv_reserved_bytes")
            usage = used / reserved if isinstance(used, (int, float)) and isinstance(reserved, (int, float)) and reserved > 0 else 0.0
            vllm["kv_usage"].add_metric([name], min(1.0, max(0.0, float(usage))))
        yield from families.values()
        yield active
        yield from vllm.values()


class MonitorAnnotator:
    """Adds the generation routes' figures to one monitor stream's snapshots: each generation
    model's row gets ``generation.api`` = :meth:`GenerationMetrics.window` plus prompt and
    generated tokens/s from the counter deltas between two snapshots (like requests/s)."""

    def __init__(self, metrics: GenerationMetrics) -> None:
        self.metrics = metrics
        self._last: dict[str, tuple[float, int, int]] = {}

    def annotate(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        now = float(snapshot.get("time") or 0.0)
        for row in snapshot.get("models") or []:
            gen = row.get("generation")
            if not isinstance(gen, dict):
                continue
            name = row.get("name", "")
            window = self.metrics.window(name)
            totals = (window["prompt_tokens_total"], window["generated_tokens_total"])
            previous = self._last.get(name)
            self._last[name] = (now, *totals)
            rates = [0.0, 0.0]
            if previous is not None and now > previous[0]:
                dt = now - previous[0]
                rates = [round(max(0, t - p) / dt, 2) for t, p in zip(totals, previous[1:])]
            live = self.metrics.live_fields(name, gen)
            row["generation"] = {**live, "api": {**window, "prompt_tokens_per_s": rates[0], "generated_tokens_per_s": rates[1]}}
            # the row's activity columns: a generation model's traffic is streams and tokens
            row["requests_per_s"] = live["streams_per_s"]
            row["rate_per_s"], row["rate_unit"] = live["tokens_per_s"], "tokens/s"
            row["p50_ms"], row["p50_of"] = live["inter_token_p50_ms"], "inter_token"
        return snapshot
