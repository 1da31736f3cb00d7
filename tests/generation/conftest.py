"""Fixtures for the generation tests: the tiny causal LM, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastmile.runtime.generation.tiny import build_tiny_lm


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real HF causal-LM folder (byte-level BPE tokenizer, chat template, Llama weights)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "tiny-lm")
