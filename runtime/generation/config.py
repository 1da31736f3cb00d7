"""Which models generate, and the generation settings of one load.

Why here and not in the settings vocabulary alone: a runner must work whatever the daemon's
settings object carries (older state files, the vocabulary being moved), so every field is
read with its default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINES = ("ort-genai", "deepspeed")
PRECISIONS = ("int4", "int8", "fp32")


def causal_lm_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a folder whose architectures end in ``ForCausalLM``, else None."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = cfg.get("architectures") or []
    return cfg if any(str(a).endswith("ForCausalLM") for a in archs) else None


def is_generation_manifest(manifest: Any) -> bool:
    """A bare HF causal-LM folder (no tensor signature written) is served as a generation model."""
    if getattr(manifest, "format", None) != "hf":
        return False
    if getattr(manifest, "from_manifest_file", False) and getattr(manifest, "hf", None) is None \
            and getattr(manifest, "inputs", ()):
        return False  # the operator described tensors: serve it as a tensor model
    hf = getattr(manifest, "hf", None)  # lastmile.models.hf's description of the folder
    if hf is not None and getattr(hf, "task", None):
        return hf.task == "generate" and causal_lm_config(Path(manifest.artifact)) is not None
    return causal_lm_config(Path(manifest.artifact)) is not None


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """The knobs of one generation model (settings vocabulary names)."""

    engine: str = "deepspeed"
    precision: str = "fp32"
    max_num_seqs: int = 8
    max_context: int = 2048
    max_queue: int = 64
    prefill_chunk: int = 256
    threads: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    keep_alive_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Any, model_max_context: int | None = None) -> "GenerationSettings":
        def get(name: str, default: Any) -> Any:
            value = getattr(settings, name, None)
            return default if value is None else value

        device = get("device", "cpu")
        engine = get("engine", "auto")
        if engine == "auto":  # ORT-GenAI's int4 kernels on CPU; DeepSpeed where there is an accelerator
            engine = "ort-genai" if device in ("auto", "cpu") else "deepspeed"
        precision = get("precision", "auto")
        if precision == "auto":
            precision = "int4"
        max_context = int(get("max_context", 0)) or min(2048, model_max_context or 2048)
        return cls(
            engine=engine, precision=precision,
            max_num_seqs=int(get("max_num_seqs", 8)), max_context=max_context,
            max_queue=int(get("max_queue", 64)), prefill_chunk=int(get("prefill_chunk", 256)),
            threads=int(get("threads", 0)), device="cpu" if device == "auto" else device,
            dtype=get("dtype", "fp32"), keep_alive_s=float(get("keep_alive_s", 0.0)),
        )
