"""The state file (``store.state_file``): what is loaded, with which settings, kept across restarts.

Written atomically (temp file in the same directory, fsync, rename, fsync of the directory) so
a crash or a full disk leaves either the old state or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

STATE_VERSION = 1


class StateError(RuntimeError):
    pass


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    """``{model name: load overrides}``; an absent file is an empty state. Entries that are
    not objects are left out (see :func:`read_state_report` to learn which)."""
    return read_state_report(path)[0]


def read_state_report(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``read_state`` plus ``{name: why}`` for the entries it had to leave out, so the daemon
    can say so (an event) instead of silently forgetting a model."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read state ({exc}); move it aside to start empty") from None
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION or not isinstance(raw.get("models"), dict):
        raise StateError(f"{path}: not a lastmile state file of version {STATE_VERSION}")
    models = {str(k): dict(v) for k, v in raw["models"].items() if isinstance(v, dict)}
    dropped = {str(k): f"its entry is {type(v).__name__} {json.dumps(v)[:80]}, not an object of load settings"
               for k, v in raw["models"].items() if not isinstance(v, dict)}
    return models, dropped


def write_state(path: Path, models: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    data = json.dumps({"version": STATE_VERSION, "models": models}, indent=2, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
