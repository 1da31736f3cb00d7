"""A tiny backend for the runner-pool tests (imported by the runner child by reference, so it
lives in a module of its own and imports nothing heavy): it doubles its one input."""

from __future__ import annotations

import numpy as np

from lastmile.runtime.backends.base import Backend


class CountingBackend(Backend):
    name = "counting"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"double": next(iter(inputs.values())) * 2}
