"""The tiny test model is deterministic and is a real HF causal-LM folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lastmile.runtime.generation.tiny import build_tiny_lm


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic_and_loads(tiny_lm: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = build_tiny_lm(tmp_path / "again")
    assert _digest(again) == _digest(tiny_lm)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("Grüße, world!").input_ids) == "Grüße, world!"  # byte-level round trip
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert model.config.architectures == ["LlamaForCausalLM"]
