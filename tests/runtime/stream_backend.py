"""A tiny backend for the streaming tests (imported by the runner child by reference, so it
lives in a module of its own and imports nothing heavy).

It counts: ``stream("count", {"n": N, "log": path, "delay_s": d})`` yields ``{"i": 0..N-1}``
and returns ``{"total": N}``; every chunk produced and the way the generator ended are
appended to ``log``, which is how a test sees what happened inside the child.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np

from lastmile.runtime.backends.base import Backend, BackendError


def _note(log: str | None, line: str) -> None:
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class CountingBackend(Backend):
    name = "counting"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"double": next(iter(inputs.values())) * 2}

    def stream(self, kind: str, payload: Any) -> Iterator[Any]:
        if kind not in ("count", "fail"):
            yield from super().stream(kind, payload)
            return None
        log = payload.get("log")
        n = int(payload["n"])
        produced = 0
        try:
            for i in range(n):
                if payload.get("delay_s"):
                    time.sleep(payload["delay_s"])
                if kind == "fail" and i == payload["fail_at"]:
                    raise BackendError(f"counting failed at {i}")
                produced += 1
                _note(log, f"produced {i}")
                yield {"i": i}
        except GeneratorExit:
            _note(log, f"cancelled after {produced}")
            raise
        _note(log, "finished")
        return {"total": n}
