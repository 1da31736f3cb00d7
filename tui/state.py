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
        return max(sorted(self.series), key=lambda n: sum(list(self.series[n].rps)[-5:]))  # ties: the first by name

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
