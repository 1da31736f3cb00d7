"""What the TUI knows about the daemon: the latest monitor snapshot, a short history of each
model's figures (for sparklines), the event log, and the connection state.

Kept free of Textual so every screen reads the same facts and tests can check them without a
terminal. The app feeds it from the monitor stream; screens only read it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lastmile.appliance.client.units import fmt_bytes

__all__ = ["fmt_bytes"]  # re-exported: the screens take every format from here

STALE_STATE = "unknown"  # a row's state while the daemon cannot be reached
HISTORY = 120  # samples kept per series (two minutes at the default 1 Hz)
EVENTS_KEPT = 2000


@dataclass
class Series:
    """One model's recent figures, oldest first."""

    rps: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    p50: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    p99: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    memory: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # bytes used
    failures: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # failed requests/s
    activity: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # see activity(): what "busiest" compares
    tokens: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # generation models: tokens/s
    ttft: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # generation models: TTFT p50 ms
    generation: bool = False


@dataclass
class Connection:
    state: str = "connecting"  # connecting | ok | lost
    error: str = ""
    attempt: int = 0
    retry_in_s: float = 0.0
    since: float = field(default_factory=time.time)  # when the current state began


class MonitorState:
    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None
        self.connection = Connection()
        self.series: dict[str, Series] = {}
        self.total_rps: deque = deque(maxlen=HISTORY)
        self.events: deque = deque(maxlen=EVENTS_KEPT)
        self.snapshots_seen = 0
        self._event_key: tuple[int | None, int] = (None, 0)  # (daemon pid, last seq) for de-duplication

    # --- feeding ---------------------------------------------------------------------------

    def ingest(self, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one snapshot; returns the events it brought that were not seen before."""
        self.snapshot = snapshot
        self.snapshots_seen += 1
        if self.connection.state != "ok":
            self.connection = Connection(state="ok")
        total = 0.0
        names = set()
        for row in snapshot.get("models", []):
            name = row["name"]
            names.add(name)
            series = self.series.setdefault(name, Series())
            rps = float(row.get("requests_per_s") or 0.0)
            total += rps
            series.rps.append(rps)
            latency = row.get("latency_ms") or {}
            series.p50.append(float(latency.get("p50") or 0.0))
            series.p99.append(float(latency.get("p99") or 0.0))
            series.memory.append(float(memory_used(row) or 0))
            series.failures.append(float(row.get("failures_per_s") or 0.0))
            series.activity.append(activity(row))
            series.generation = is_generation(row)
            if series.generation:
                figures = generation_figures(row)
                series.tokens.append(float(figures["tokens_per_s"] or 0.0))
                series.ttft.append(float(figures["ttft_p50_ms"] or 0.0))
        for gone in set(self.series) - names:
            del self.series[gone]
        self.total_rps.append(total)
        pid = (snapshot.get("daemon") or {}).get("pid")
        fresh = []
        for event in snapshot.get("events", []):
            last_pid, last_seq = self._event_key
            if pid == last_pid and event["seq"] <= last_seq:
                continue
            self._event_key = (pid, event["seq"])
            self.events.append(event)
            fresh.append(event)
        return fresh

    def mark(self, marker: dict[str, Any]) -> None:
        """A connection marker from the monitor stream (lost / retrying / restored)."""
        kind = marker.get("connection")
        if kind in ("lost", "retrying"):
            since = self.connection.since if self.connection.state == "lost" else time.time()
            self.connection = Connection("lost", marker.get("error", ""), int(marker.get("attempt", 0)), float(marker.get("retry_in_s", 0.0)), since)
        elif kind == "restored":
            self.connection = Connection("connecting")

    # --- reading ---------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """The figures on screen are the last ones seen, not live: the stream is down (or
        still reconnecting), so no row's state can be vouched for."""
        return self.snapshot is not None and self.connection.state != "ok"

    def shown_state(self, row: dict[str, Any]) -> str:
        """A model's state as the screens show it: :data:`STALE_STATE` while the daemon is
        unreachable (a row must not stay green "ready" after the daemon died)."""
        return STALE_STATE if self.stale else row["state"]

    @property
    def daemon(self) -> dict[str, Any]:
        return (self.snapshot or {}).get("daemon") or {}

    @property
    def models(self) -> list[dict[str, Any]]:
        return list((self.snapshot or {}).get("models", []))

    def busiest(self) -> str | None:
        """The model under the most load now (req/s of the last few samples), for the charts
        that follow load rather than the cursor; ``None`` when nothing is loaded."""
        if not self.series:
            return None
        return max(sorted(self.series), key=lambda n: sum(list(self.series[n].activity)[-5:]))  # ties: the first by name

    def model_events(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("model") == name][-limit:]

    def model(self, name: str) -> dict[str, Any] | None:
        for row in self.models:
            if row["name"] == name:
                return row
        return None


# --- formatting -----------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def fmt_time(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def memory_used(row: dict[str, Any]) -> float | None:
    """A model's memory in bytes: the memory manager's figure when the daemon reports it, else
    the runner processes' resident size. The dashboard shows and sorts by this one number."""
    memory = row.get("memory")
    used = memory.get("used_bytes") if isinstance(memory, dict) else None
    return used if used is not None else row.get("rss_bytes")


def memory_limit(row: dict[str, Any]) -> float | None:
    memory = row.get("memory")
    limit = memory.get("limit_bytes") if isinstance(memory, dict) else None
    if limit is None and row.get("memory_limit_mb"):
        limit = row["memory_limit_mb"] * 1024 * 1024
    return limit


def model_memory_text(row: dict[str, Any]) -> str:
    """The Memory cell: used, and the limit when there is one (``30.6 MiB/256.0 MiB``)."""
    limit = memory_limit(row)
    return fmt_bytes(memory_used(row)) + (f"/{fmt_bytes(limit)}" if limit else "")


def fmt_memory(row: dict[str, Any]) -> str:
    """A model's memory with its limit and the admission estimate (the tune and detail views)."""
    memory = row.get("memory")
    estimate = memory.get("estimate_bytes") if isinstance(memory, dict) else None
    text = fmt_bytes(memory_used(row))
    limit = memory_limit(row)
    if limit:
        text += f" of {fmt_bytes(limit)} limit"
    return f"{text} (estimate {fmt_bytes(estimate)})" if estimate else text


# --- what runs, and a generation model's live figures ------------------------------------------
#
# The daemon's rows say what the runner reported it runs (``runs``: engine, precision, device,
# dtype) and, for a generation model, its figures flat under ``generation`` (``tokens_per_s``,
# ``ttft_p50_ms`` ...). Older daemons had only ``backend_info`` and the monitor's
# ``generation.api`` / the engine's ``ttft_s`` summaries: those are read when the flat names are
# absent, and a figure nobody reports shows as "-".


def is_generation(row: dict[str, Any]) -> bool:
    return isinstance(row.get("generation"), dict)


def runs(row: dict[str, Any]) -> dict[str, Any]:
    """``{"engine", "precision", "device", "dtype"}`` as the runner reported them (empty
    values where it has not reported yet); never the requested settings."""
    reported = row.get("runs")
    if isinstance(reported, dict):
        return reported
    info = row.get("backend_info") if isinstance(row.get("backend_info"), dict) else {}
    gen = row.get("generation") if is_generation(row) else {}
    engine = gen.get("engine") or info.get("engine") or (info.get("backend") if info else None)
    precision = gen.get("precision") or info.get("precision") or gen.get("dtype") or info.get("dtype")
    if engine is None and not is_generation(row):
        engine = row.get("backend")  # a daemon that reports nothing more: its backend
    return {"engine": engine, "precision": precision, "device": info.get("device") or row.get("device"), "dtype": info.get("dtype")}


def runs_short(row: dict[str, Any]) -> str:
    """The table's cell: ``ort-genai int4``, ``onnxruntime fp32``; ``-`` before a report."""
    r = runs(row)
    parts = [str(v) for v in (r.get("engine"), r.get("precision")) if v]
    return " ".join(parts) or "-"


def runs_long(row: dict[str, Any]) -> str:
    """The detail view's words: ``ort-genai int4 on cpu`` (the daemon's own text when it sends one)."""
    text = row.get("runs_text")
    if isinstance(text, str) and text:
        return text
    r = runs(row)
    return runs_short(row) + (f" on {r['device']}" if r.get("device") else "")


def _ms(summary: Any, p: str) -> float | None:
    value = summary.get(p) if isinstance(summary, dict) else None
    return None if value is None else float(value) * 1000


def generation_figures(row: dict[str, Any]) -> dict[str, Any]:
    """A generation model's live figures under one set of names (None where not reported):
    ``tokens_per_s``, ``ttft_p50_ms``, ``ttft_p99_ms``, ``itl_p50_ms``, ``itl_p99_ms``,
    ``running``, ``waiting``, ``max_num_seqs``, ``kv_used_bytes``, ``kv_reserved_bytes``."""
    gen = row.get("generation") if is_generation(row) else {}
    api = gen.get("api") if isinstance(gen.get("api"), dict) else {}

    def first(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    return {
        "tokens_per_s": first(gen.get("tokens_per_s"), api.get("tokens_per_s"), api.get("generated_tokens_per_s")),
        "ttft_p50_ms": first(gen.get("ttft_p50_ms"), (api.get("ttft_ms") or {}).get("p50"), _ms(gen.get("ttft_s"), "p50")),
        "ttft_p99_ms": first(gen.get("ttft_p99_ms"), (api.get("ttft_ms") or {}).get("p99"), _ms(gen.get("ttft_s"), "p99")),
        "itl_p50_ms": first(gen.get("inter_token_p50_ms"), (api.get("inter_token_ms") or {}).get("p50"), _ms(gen.get("inter_token_s"), "p50")),
        "itl_p99_ms": first(gen.get("inter_token_p99_ms"), (api.get("inter_token_ms") or {}).get("p99"), _ms(gen.get("inter_token_s"), "p99")),
        "running": gen.get("running"),
        "waiting": gen.get("waiting"),
        "max_num_seqs": gen.get("max_num_seqs"),
        "kv_used_bytes": gen.get("kv_used_bytes"),
        "kv_reserved_bytes": gen.get("kv_reserved_bytes"),
    }


def activity(row: dict[str, Any]) -> float:
    """How busy a model is now, for "the busiest model": requests/s, or for a generation
    model the sequences in flight (it may start no request for many seconds while it serves)."""
    if is_generation(row):
        g = generation_figures(row)
        return float(row.get("requests_per_s") or 0.0) + float(g["running"] or 0) + float(g["waiting"] or 0)
    return float(row.get("requests_per_s") or 0.0)


def kv_text(row: dict[str, Any]) -> str:
    """KV cache used/reserved (``12.0 MiB/96.0 MiB``); ``-`` when not reported."""
    g = generation_figures(row)
    if g["kv_reserved_bytes"] is None and g["kv_used_bytes"] is None:
        return "-"
    return f"{fmt_bytes(g['kv_used_bytes'] or 0)}/{fmt_bytes(g['kv_reserved_bytes'])}"


def generation_parts(row: dict[str, Any]) -> list[str]:
    """A generation model's live figures as short phrases (:func:`pack` lays them out)."""
    g = generation_figures(row)
    seqs = f"running {'-' if g['running'] is None else g['running']}" + (f"/{g['max_num_seqs']}" if g["max_num_seqs"] else "")
    return [f"tokens/s {fmt_rate(g['tokens_per_s'])}", f"TTFT p50 {fmt_ms(g['ttft_p50_ms'])} ms p99 {fmt_ms(g['ttft_p99_ms'])} ms",
            f"inter-token p50 {fmt_ms(g['itl_p50_ms'])} ms p99 {fmt_ms(g['itl_p99_ms'])} ms",
            f"{seqs}  waiting {'-' if g['waiting'] is None else g['waiting']}", f"KV used/reserved {kv_text(row)}"]


def pack(parts: list[str], width: int, sep: str = "  ") -> str:
    """``parts`` joined by ``sep``, a new line wherever the next one would pass ``width``, so
    no line wraps in the middle of a figure (a phrase longer than ``width`` keeps its line)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return "\n".join(lines)


def generation_line(row: dict[str, Any], width: int = 100) -> str:
    """A generation model's live figures in lines of at most ``width`` (detail, tune, chat)."""
    return pack(generation_parts(row), width)
