"""Shared fixtures: the demo models are built once per session (about 7 s on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU here; keep DeepSpeed off auto-detection


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lastmile.models.demo import build_demo

    store = tmp_path_factory.mktemp("demo-store") / "models"
    build_demo(store)
    return store


def tensor_tables(inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """The ``[[inputs]]`` and ``[[outputs]]`` tables of a model.toml, FP32, one per name with
    its shape (``"[-1, 4]"``). One writer for the test manifests, so tests that edit the text
    with ``str.replace`` all see the same layout: a blank line between tables."""
    tables = [("inputs", name, shape) for name, shape in inputs.items()]
    tables += [("outputs", name, shape) for name, shape in outputs.items()]
    return "\n".join(f'[[{kind}]]\nname = "{name}"\ndatatype = "FP32"\nshape = {shape}\n' for kind, name, shape in tables)
