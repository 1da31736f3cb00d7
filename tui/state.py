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

HISTORY = 120  # samples kept per series (two minutes at the default 1 Hz)
EVENTS_KEPT = 2000


@dataclass
class Series:
    """One model's recent figures, oldest first."""

    rps: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    p50: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    p99: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


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
    def daemon(self) -> dict[str, Any]:
        return (self.snapshot or {}).get("daemon") or {}

    @property
    def models(self) -> list[dict[str, Any]]:
        return list((self.snapshot or {}).get("models", []))

    def model(self, name: str) -> dict[str, Any] | None:
        for row in self.models:
            if row["name"] == name:
                return row
        return None


# --- formatting -----------------------------------------------------------------------------


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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


def fmt_memory(row: dict[str, Any]) -> str:
    """A model's memory: the runner processes' resident size, and its limit when it has one.
    Uses the memory manager's own figure (``row["memory"]``) once the daemon reports it."""
    memory = row.get("memory")
    used = None
    if isinstance(memory, dict):
        used = memory.get("used_bytes")
    if used is None:
        used = row.get("rss_bytes")
    limit = row.get("memory_limit_mb")
    text = fmt_bytes(used)
    if limit:
        text = f"{text} / {limit} MiB"
    estimate = memory.get("estimate_bytes") if isinstance(memory, dict) else None
    return f"{text} (est {fmt_bytes(estimate)})" if estimate else text
