"""What a generation model needs in memory, and the smaller loads that would fit.

Footprint = weights at the served precision + max_num_seqs x max_context x KV bytes per token
(2 x layers x kv_heads x head_dim x KV dtype bytes: measured here within 3% of RSS growth,
+18 / +187 / +369 MiB at context 256 / 4096 / 8192 for SmolLM2's fp32 KV) + the runtime.
At 8k context the KV cache is 4x SmolLM2's int4 weights, so the options a refused load gets
are the ones that shrink it: a shorter context, fewer slots, int4 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lastmile.runtime.memory.estimate import Estimate, artifact_weights, budget_device
from lastmile.runtime.memory.units import MiB as MB
from lastmile.runtime.generation.config import GenerationSettings, causal_lm_config
from lastmile.runtime.generation.engine import ModelShape

#: Runtime beside the weights and KV (interpreter share, tokenizer, session arenas): assumed.
ENGINE_OVERHEAD_BYTES = {"ort-genai": 80 * MB, "deepspeed": 160 * MB}
#: Bytes per fp32 byte of a quantized MatMul weight (int4/int8 blocks of 32 with a scale each).
QUANTIZED_SHARE = {"int4": 0.5625 / 4, "int8": 1.125 / 4, "fp32": 1.0}


def generation_estimate(manifest: Any, settings: Any, device: str) -> Estimate:
    """The load's Estimate in the shape the memory governor compares against its budgets."""
    cfg = causal_lm_config(Path(manifest.artifact)) or {}
    shape = ModelShape.from_config(cfg)
    gs = GenerationSettings.from_settings(settings, cfg)
    fp32 = artifact_weights(manifest).at("fp32")
    notes = []
    if gs.engine == "ort-genai":
        precision = expected_precision(Path(manifest.artifact), gs.precision)
        vocab, hidden = int(cfg.get("vocab_size") or 0), int(cfg.get("hidden_size") or 0)
        embed = vocab * hidden * 4  # the builder keeps the embedding table in fp32
        rest = max(0, fp32 - embed)
        if cfg.get("tie_word_embeddings"):
            rest += embed  # the tied LM head becomes a quantized MatMul of its own
        weights = embed + int(rest * QUANTIZED_SHARE[precision])
        kv_dtype = 4  # CPU ORT-GenAI keeps the KV cache in fp32
        notes.append(f"ort-genai {precision} weights (embedding table fp32, MatMuls {precision})"
                     + (" chosen by measured quality" if gs.precision == "auto" else ""))
    else:
        dtype_bytes = 2 if gs.dtype in ("bf16", "fp16") else 4
        weights = int(fp32 * dtype_bytes / 4)
        kv_dtype = dtype_bytes
        notes.append(f"deepspeed {gs.dtype} weights")
    kv_token = shape.kv_bytes_per_token(kv_dtype)
    kv = gs.max_num_seqs * gs.max_context * kv_token
    notes.append(f"KV cache {gs.max_num_seqs} slots{' (auto, from memory)' if gs.max_num_seqs_auto else ''} "
                 f"x {gs.max_context} tokens x {kv_token} B/token "
                 f"(2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} x {kv_dtype} B)")
    overhead = ENGINE_OVERHEAD_BYTES.get(gs.engine, 120 * MB)
    if gs.engine == "ort-genai":
        from lastmile.runtime.generation.ort_engine import PREFIX_CACHE_BYTES

        overhead += PREFIX_CACHE_BYTES
        notes.append(f"prompt-prefix KV cache up to {PREFIX_CACHE_BYTES // MB} MiB (dropped by the ladder's shrink)")
    target = budget_device(device)
    per_device = {"host": weights + kv + overhead} if target == "host" else {target: weights + kv, "host": overhead}
    return Estimate(model=manifest.name, backend=gs.engine, device=device, settings=settings.as_dict(),
                    weights_bytes=weights, workspace_bytes=kv, pool_bytes=0, overhead_bytes=overhead,
                    per_device=per_device, notes=notes)


def expected_precision(folder: Path, precision: str) -> str:
    """The precision a load will serve: as given, or what ``auto`` measured for this source
    (before the first measurement: the cheapest candidate, corrected once it is known)."""
    if precision != "auto":
        return precision
    from lastmile.runtime.generation import quality

    found = quality.recorded(folder)
    return found["chosen"] if found else quality.candidates(folder)[0]


def generation_variants(settings: Any, model_max_context: int | None) -> list[tuple[dict[str, Any], str]]:
    """Smaller loads to try, in the order an operator would (keep the model's answers first):
    a shorter context, fewer slots, int4 weights on ORT-GenAI, then combinations."""
    gs = GenerationSettings.from_settings(settings, model_max_context)
    out: list[tuple[dict[str, Any], str]] = []
    ctx = gs.max_context
    while ctx > 256:
        ctx //= 2
        out.append(({"max_context": ctx}, f"max_context {gs.max_context} -> {ctx}"))
    seqs = gs.max_num_seqs
    while seqs > 1:
        seqs //= 2
        out.append(({"max_num_seqs": seqs}, f"max_num_seqs {gs.max_num_seqs} -> {seqs}"))
    if gs.engine != "ort-genai" or gs.precision != "int4":
        was = f"{gs.engine} {gs.precision if gs.engine == 'ort-genai' else gs.dtype}"
        out.append(({"engine": "ort-genai", "precision": "int4"}, f"int4 on ort-genai instead of {was}"))
        ctx = gs.max_context
        while ctx > 256:
            ctx //= 2
            out.append(({"engine": "ort-genai", "precision": "int4", "max_context": ctx},
                        f"int4 on ort-genai and max_context {gs.max_context} -> {ctx}"))
    return out
