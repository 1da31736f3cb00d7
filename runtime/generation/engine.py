"""The one interface a generation scheduler drives: add sequences, step, cancel (= free).

An engine owns the model and the KV cache of the sequences it holds. It admits sequences FIFO
into at most ``max_num_seqs`` slots and produces at most one token per running sequence per
``step``. Deciding when a sequence ends (EOS, max_tokens, stop strings, deadline, the client
leaving) is the scheduler's job: it calls ``cancel`` and the engine frees the slot and its KV
at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from lastmile.runtime.generation.types import SamplingParams


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What KV-cache arithmetic needs from a causal-LM config."""

    layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelShape":
        """From a transformers config object or a config.json dict."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            layers=int(get("num_hidden_layers")),
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            max_position_embeddings=int(get("max_position_embeddings") or 2048),
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


class GenerationEngine(ABC):
    """A loaded causal LM with continuous batching."""

    name: str  # "deepspeed" | "ort-genai"
    eos_token_ids: frozenset[int]

    def __init__(self, max_num_seqs: int, max_context: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_context = max_context
        self.failed: list[tuple[int, str]] = []  # (seq_id, why): sequences ended by an error of their own

    def take_failures(self) -> list[tuple[int, str]]:
        """Sequences the last steps ended because of an error in their own work (a sampling
        value the kernel refused, say): already dropped from the engine; the others go on."""
        failed, self.failed = self.failed, []
        return failed

    @abstractmethod
    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, constraint: Any = None) -> None:
        """Queue a sequence; it takes a slot when one frees up (FIFO). ``constraint`` (a
        ``constraints.SeqConstraint``) masks its logits before each choice and consumes the
        chosen token."""

    @abstractmethod
    def step(self) -> list[tuple[int, int]]:
        """Advance every admitted sequence by one iteration; ``(seq_id, token_id)`` for each
        token produced (a sequence whose prefill is still running produces none)."""

    @abstractmethod
    def cancel(self, seq_id: int) -> None:
        """Drop a sequence wherever it is (waiting, prefilling, running) and free its KV now.
        Unknown ids are ignored (a sequence may end and be cancelled in the same step)."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether ``step`` would do anything."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """``running``, ``waiting``, ``kv_used_bytes``, ``kv_reserved_bytes``."""

    def shrink(self) -> None:
        """Drop what the engine keeps only to be faster (the memory ladder's first step)."""

    def info(self) -> dict[str, Any]:
        """What was chosen (engine, dtype/precision...), for the model's description."""
        return {"engine": self.name, "max_num_seqs": self.max_num_seqs, "max_context": self.max_context}

    def close(self) -> None:
        """Release the model."""
