"""What the benchmark's servers share: loading a model from a store with the same backend and
session settings Lastmile's runner would use, and its example inputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

DATATYPES = {"input": "FP32", "input_ids": "INT64"}


def prepare_env() -> None:
    """Same process environment as a Lastmile runner (before torch is imported)."""
    from lastmile.runtime.backends.threads import set_thread_env

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    set_thread_env()


def load_backend(store: str | Path, name: str, settings: dict[str, Any] | None = None) -> Any:
    """The model's backend, built exactly as a runner builds it (``create_backend``), with the
    manifest's settings overlaid by ``settings``."""
    prepare_env()
    from lastmile.models.settings import ModelSettings
    from lastmile.models.store import ModelStore
    from lastmile.runtime.backends import create_backend

    manifest = ModelStore(Path(store)).get(name)
    eff = ModelSettings().overlay(manifest.settings).overlay({"backend": manifest.backend, **(settings or {})})
    return create_backend(manifest, eff)


def kind_of(name: str) -> str:
    return "lm" if "-lm" in name else "mlp"


def inputs_for(name: str, rows: int, seq: int = 16) -> dict[str, np.ndarray]:
    from lastmile.models.demo import example_inputs

    return example_inputs(kind_of(name), rows, seq=seq)


def datatypes_for(inputs: dict[str, np.ndarray]) -> dict[str, str]:
    from lastmile.models.spec import NUMPY_TO_V2

    return {k: DATATYPES.get(k) or NUMPY_TO_V2[v.dtype] for k, v in inputs.items()}
