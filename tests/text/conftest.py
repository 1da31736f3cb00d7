"""Real Hugging Face folders for the text tests, written by ``save_pretrained`` from a tiny
config and a fixed seed (lastmile.models.demo_text), once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers encoder (BertModel -> mean pooling -> Normalize)."""
    from lastmile.models.demo_text import build_encoder_folder

    return build_encoder_folder(tmp_path_factory.mktemp("hf") / "encoder")


@pytest.fixture(scope="session")
def classifier_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForSequenceClassification with labels negative/positive."""
    from lastmile.models.demo_text import build_encoder_folder

    return build_encoder_folder(tmp_path_factory.mktemp("hf") / "classifier", task="text-classification")
