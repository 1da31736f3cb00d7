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
