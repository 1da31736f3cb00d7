"""Measured footprints per artifact: after a load, what the model's runners really used, kept
by the artifact's content hash and used for the next admission of that artifact.

Why: the static estimate (:mod:`lastmile.runtime.memory.estimate`) is read from the artifact
without loading it and can be far off for an operator's own model (one ONNX model was
estimated at 10 MB and used 39 MB). Once a model has run here, the error is known: the next
estimate for the same bytes (same SHA-256), backend, dtype, graph fusion, device and
limited-or-not and ``max_batch_size`` adds that error as its ``measured_correction`` part
(``source: "measured"``). The batch size is part of the key because the reading at "ready"
follows a warm-up at ``max_batch_size``: what the backend keeps from it (ORT's arena) is an
error of the workspace part that does not carry over to another batch size (measured:
demo-lm's error at 256 rows, added at 8 rows, pushed a 60 MiB limit out of reach). Per
instance, added, not multiplied.

The book is a small JSON file beside the state file (``footprints.json``), rewritten
atomically; without a path (tests, tools) it lives in memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lastmile.runtime.memory.units import MiB

logger = logging.getLogger("lastmile.memory")

MAX_RECORDS = 512  # oldest dropped past this: the file stays small whatever is loaded
RECORD_STEP_BYTES = MiB  # a new peak is written only when it grew by this much


def _stamp(path: Path) -> tuple[int, int]:
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files), max((p.stat().st_mtime_ns for p in files), default=0)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def content_digest(path: Path) -> str:
    """SHA-256 of the artifact's bytes (a folder: of every file's relative path and bytes, in
    order). Reads the whole artifact: call it off the event loop."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class FootprintBook:
    def __init__(self, path: Path | None = None) -> None:
        self.path: Path | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, tuple[tuple[int, int], str]] = {}
        if path is not None:
            self.open(path)

    def open(self, path: Path) -> None:
        """Use ``path`` from now on, reading what it holds (an unreadable file: start empty,
        with a warning; it is rewritten at the next record)."""
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
            records = data.get("records", {}) if isinstance(data, dict) else {}
            self.records = {k: v for k, v in records.items() if isinstance(v, dict) and isinstance(v.get("measured_bytes"), int)}
            for rec in self.records.values():
                if rec.get("artifact") and rec.get("stamp"):
                    self._digests[rec["artifact"]] = (tuple(rec["stamp"]), rec["sha256"])  # type: ignore[assignment]
        except FileNotFoundError:
            self.records = {}
        except (OSError, ValueError) as exc:
            logger.warning("footprint records %s unreadable (%s): starting empty", self.path, exc)
            self.records = {}

    # --- digests ---------------------------------------------------------------------------

    def cached_digest(self, artifact: Path) -> str | None:
        """The digest when known for the artifact as it is now on disk (no reading)."""
        seen = self._digests.get(str(artifact))
        try:
            return seen[1] if seen and seen[0] == _stamp(artifact) else None
        except OSError:
            return None

    def digest(self, artifact: Path) -> str:
        """The digest, computed when the artifact changed or was never seen (blocking)."""
        known = self.cached_digest(artifact)
        if known:
            return known
        stamp = _stamp(artifact)
        value = content_digest(artifact)
        self._digests[str(artifact)] = (stamp, value)
        return value

    # --- records ---------------------------------------------------------------------------

    @staticmethod
    def key(digest: str, backend: str, settings: Any, device: str) -> str:
        limited = "limited" if settings.memory_limit_mb else "unlimited"
        return f"{digest}:{backend}:{settings.dtype}:{settings.graph_fusion}:{device}:{limited}:b{settings.max_batch_size}"

    def get(self, key: str | None) -> dict[str, Any] | None:
        return self.records.get(key) if key else None

    def record(self, key: str, *, model: str, artifact: Path, measured_bytes: int, static_bytes: int,
               settings: Any) -> dict[str, Any] | None:
        """Keep ``measured_bytes`` (per instance) for ``key`` when it is the first figure or a
        new peak; returns the record when it changed (and was written), else None."""
        old = self.records.get(key)
        if old is not None and measured_bytes < old["measured_bytes"] + RECORD_STEP_BYTES:
            return None
        digest = key.split(":", 1)[0]
        try:
            stamp = list(_stamp(artifact))
        except OSError:
            stamp = None
        rec = {
            "model": model, "artifact": str(artifact), "sha256": digest, "stamp": stamp,
            "measured_bytes": int(measured_bytes), "static_estimate_bytes": int(static_bytes),
            "error": round((measured_bytes - static_bytes) / static_bytes, 4) if static_bytes else None,
            "max_batch_size": settings.max_batch_size, "recorded_at": time.time(),
        }
        self.records[key] = rec
        if len(self.records) > MAX_RECORDS:
            oldest = sorted(self.records, key=lambda k: self.records[k].get("recorded_at", 0))
            for k in oldest[: len(self.records) - MAX_RECORDS]:
                del self.records[k]
        self.save()
        return rec

    def save(self) -> None:
        """Atomic rewrite; a failure (disk full, read-only) is a warning: the records stay in
        memory and the next record tries again."""
        if self.path is None:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".footprints-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "records": self.records}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not write footprint records %s: %s", self.path, exc)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
