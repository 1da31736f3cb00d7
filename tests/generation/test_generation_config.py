"""What a generation load resolves to: one answer to "what runs it", slots from memory, and
precision "auto" by measured agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lastmile.models.settings import ModelSettings, SettingError
from lastmile.runtime.generation import quality
from lastmile.runtime.generation.config import AUTO_MAX_SEQS, GenerationSettings

CFG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
       "max_position_embeddings": 8192}


def resolve(**changes) -> GenerationSettings:
    return GenerationSettings.from_settings(ModelSettings().overlay(changes), CFG)


def test_backend_names_the_engine_and_a_contradiction_is_refused_with_the_field():
    assert resolve(backend="deepspeed").engine == "deepspeed"  # was silently ort-genai int4
    assert resolve(backend="onnxruntime").engine == "ort-genai"
    assert resolve().engine == "ort-genai"  # auto on CPU
    assert resolve(engine="deepspeed").engine == "deepspeed"
    with pytest.raises(SettingError) as refused:
        resolve(backend="onnxruntime", engine="deepspeed")
    assert refused.value.key == "engine" and "contradicts" in str(refused.value)
    with pytest.raises(SettingError) as refused:
        resolve(engine="ort-genai", dtype="bf16")
    assert refused.value.key == "dtype"
    assert resolve(backend="deepspeed", dtype="bf16").dtype == "bf16"


def test_auto_slots_come_from_memory_and_an_explicit_count_is_kept():
    per_slot = 2048 * 2 * 30 * 3 * 64 * 4  # max_context x fp32 KV bytes per token
    assert resolve().max_num_seqs == AUTO_MAX_SEQS and resolve().max_num_seqs_auto  # a 24 GiB box has room
    small = resolve(memory_limit_mb=(4 * per_slot) // (1 << 20) * 2 + 2)  # half the limit holds 4 slots
    assert small.max_num_seqs == 4
    assert resolve(memory_limit_mb=64).max_num_seqs == 1  # never 0
    assert resolve(max_num_seqs=3).max_num_seqs == 3 and not resolve(max_num_seqs=3).max_num_seqs_auto


def test_auto_precision_skips_int4_for_a_4_bit_source_and_takes_the_cheapest_that_agrees(tmp_path: Path):
    (tmp_path / ".lastmile").mkdir()
    assert quality.candidates(tmp_path) == ("int4", "int8")  # source precision unknown: all
    (tmp_path / ".lastmile/source.json").write_text(json.dumps({"quantization": "Q4_1", "bits": 4}))
    assert quality.candidates(tmp_path) == ("int8",)  # not rounded to 4 bits twice
    ok = quality.MIN_AGREEMENT
    assert quality.choose({"int4": ok, "int8": 1.0}, ("int4", "int8")) == "int4"
    assert quality.choose({"int4": ok - 0.01, "int8": ok}, ("int4", "int8")) == "int8"
    assert quality.choose({"int4": 0.1, "int8": ok - 0.01}, ("int4", "int8")) == "fp32"
    assert quality.agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert quality.agreement([[1, 2], [5]], [[1, 2], [5, 6]]) == 1.0
