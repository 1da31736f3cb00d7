"""The one interface a runner process drives: load once, run whole batches, report memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest


class BackendError(RuntimeError):
    """A model could not be loaded or run; the message is shown to the operator as is."""


class Backend(ABC):
    """A loaded model inside a runner process.

    ``run`` takes and returns whole batches keyed by tensor name, dim 0 being the batch. Inputs
    may be read-only views of shared memory: a backend must not write into them.
    """

    name: str  # "onnxruntime" | "deepspeed"

    def __init__(self, manifest: Manifest, settings: ModelSettings) -> None:
        self.manifest = manifest
        self.settings = settings

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over a batch."""

    def memory(self) -> dict[str, int]:
        """Bytes this backend holds beyond the process RSS, e.g. ``device_allocated``."""
        return {}

    def shrink(self) -> None:
        """Give cached memory back (arena shrink, ``empty_cache``); the first mitigation step."""

    def info(self) -> dict[str, Any]:
        """What was actually chosen (provider, dtype, fusion applied...), for ``/lm/v1/models``."""
        return {}

    def close(self) -> None:
        """Release what ``__init__`` took."""
