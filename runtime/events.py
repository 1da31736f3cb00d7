"""The event log: every load, unload, failure, restart and mitigation step, in order, so the
operator can see what the appliance did and why (``GET /lm/v1/events``, the TUI's events pane)."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any

logger = logging.getLogger("lastmile.events")


class EventLog:
    def __init__(self, capacity: int = 2000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seq = itertools.count(1)

    def record(self, kind: str, message: str, *, model: str | None = None, level: str = "info", **data: Any) -> dict[str, Any]:
        event = {"seq": next(self._seq), "time": time.time(), "kind": kind, "level": level, "model": model, "message": message, "data": data}
        self._events.append(event)
        logger.log(logging.WARNING if level in ("warning", "error") else logging.INFO, message, extra={"fields": {"event": kind, "model": model or "-"}})
        return event

    def since(self, seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Events newer than ``seq``, oldest first, at most ``limit`` (the newest ones)."""
        newer = [e for e in self._events if e["seq"] > seq]
        return newer[-limit:]
