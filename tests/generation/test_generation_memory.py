"""KV-cache arithmetic and admission for generation models: a load that does not fit is
refused (507) before any process starts, with the options that would fit and what they free."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.memory.units import MiB as MB
from lastmile.runtime.events import EventLog
from lastmile.runtime.generation.engine import ModelShape
from lastmile.runtime.manager import ModelManager
from lastmile.runtime.memory import InsufficientMemory


def test_kv_bytes_per_token_smollm2_shape():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; fp32 KV = 46,080 B/token, so 8k tokens
    # = 360 MiB (measured RSS growth here: +369 MiB)
    shape = ModelShape.from_config({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                    "hidden_size": 576, "max_position_embeddings": 8192})
    assert shape.kv_bytes_per_token(4) == 46_080
    assert shape.kv_bytes_per_token(4) * 8192 == 360 * MB


@pytest.fixture
def manager(tiny_lm: Path, tmp_path: Path) -> ModelManager:
    shutil.copytree(tiny_lm, tmp_path / "store" / "tiny")
    return ModelManager(ModelStore(tmp_path / "store"), ModelSettings(), EventLog())


async def test_load_that_does_not_fit_is_refused_with_options(manager: ModelManager):
    ask = {"engine": "deepspeed", "max_num_seqs": 64, "max_context": 4096, "memory_limit_mb": 200}
    dry = manager.estimate("tiny", ask)
    kv = 64 * 4096 * 512  # tiny LM: 2 x 2 layers x 2 KV heads x 16 x 4 B = 512 B/token
    assert dry["estimate"]["parts"]["workspace_bytes"] == kv
    assert not dry["fits"]
    with pytest.raises(InsufficientMemory) as e:
        await manager.load("tiny", ask)
    assert "tiny" not in manager.models
    options = {o["option"]: o for o in e.value.detail["options"]}
    ctx = options["generation_max_context"]
    assert ctx["settings"] == {"max_context": 1024}
    assert ctx["description"] == f"max_context 4096 -> 1024 frees {(kv - kv // 4) / MB:.0f} MiB"
    assert options["generation_max_num_seqs"]["settings"] == {"max_num_seqs": 16}
    assert "max_context 4096 -> 1024" in str(e.value)
    # each option really fits
    for o in options.values():
        assert manager.estimate("tiny", {**ask, **o["settings"]})["fits"], o
