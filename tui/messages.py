"""Typed messages the workers post to the app and screens (backend calls never touch widgets
directly: they run in workers and report through these)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class SnapshotArrived(Message):
    """A monitor snapshot from ``/lm/v1/monitor``."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__()
        self.snapshot = snapshot


class ConnectionChanged(Message):
    """The monitor stream was lost, is retrying, or was restored."""

    def __init__(self, marker: dict[str, Any]) -> None:
        super().__init__()
        self.marker = marker


class LoadProgress(Message):
    """A load in flight reached ``phase`` (polled from ``GET /lm/v1/models/{name}``)."""

    def __init__(self, name: str, phase: str, state: str | None) -> None:
        super().__init__()
        self.name, self.phase, self.state = name, phase, state


class LoadFinished(Message):
    """A load/reload/unload ended: ``error`` is the daemon's message when it failed."""

    def __init__(self, name: str, action: str, row: dict[str, Any] | None, error: str | None, seconds: float) -> None:
        super().__init__()
        self.name, self.action, self.row, self.error, self.seconds = name, action, row, error, seconds


class StoreListed(Message):
    """``GET /lm/v1/models``: the store and what is loaded."""

    def __init__(self, listing: dict[str, Any]) -> None:
        super().__init__()
        self.listing = listing


class Tuned(Message):
    def __init__(self, name: str, changes: dict[str, Any], row: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.name, self.changes, self.row, self.error = name, changes, row, error


class InferDone(Message):
    """Playground results: one entry per request of a burst, or the error."""

    def __init__(self, name: str, results: list[tuple[dict[str, Any], dict[str, Any]]], error: str | None, wall_ms: float) -> None:
        super().__init__()
        self.name, self.results, self.error, self.wall_ms = name, results, error, wall_ms


class EventsFetched(Message):
    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__()
        self.events = events


class SpecFetched(Message):
    """A loaded model's V2 metadata (its input and output tensors)."""

    def __init__(self, name: str, metadata: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.name, self.metadata, self.error = name, metadata, error


class EstimateReady(Message):
    """``POST /lm/v1/memory/estimate``: what a load would need and whether it fits now."""

    def __init__(self, name: str, data: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.name, self.data, self.error = name, data, error
