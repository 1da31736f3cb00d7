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


#: ``backend`` and ``engine`` answer one question (what runs the model): a generation model's
#: backend names its engine; a contradiction is refused, never resolved silently.
ENGINE_OF_BACKEND = {"deepspeed": "deepspeed", "onnxruntime": "ort-genai"}
#: ``max_num_seqs = 0`` (auto): at most this many slots...
AUTO_MAX_SEQS = 16
#: ... and their KV cache (reserved: slots x max_context x KV bytes per token) within this share
#: of the model's ``memory_limit_mb``, or of the host's RAM when it has no limit.
AUTO_KV_SHARE_OF_LIMIT = 0.5
AUTO_KV_SHARE_OF_RAM = 0.25


def _refuse(key: str, message: str) -> Exception:
    from lastmile.models.settings import SettingError

    return SettingError(key, message)


def resolve_engine(backend: str, engine: str, device: str) -> str:
    """The engine for a generation model: the one ``backend`` names, else ``engine``, else
    ORT-GenAI's graph on CPU and DeepSpeed on an accelerator."""
    if backend not in ("auto", None):
        wanted = ENGINE_OF_BACKEND.get(backend)
        if wanted is None:
            raise _refuse("backend", f"{backend!r} does not run generation models; possible: "
                          + ", ".join(f"{b} (engine {e})" for b, e in ENGINE_OF_BACKEND.items()))
        if engine not in ("auto", None, wanted):
            raise _refuse("engine", f"engine {engine!r} contradicts backend {backend!r} (which is engine {wanted!r}); "
                          "give one of them")
        return wanted
    if engine not in ("auto", None):
        return engine
    return "ort-genai" if device in ("auto", "cpu") else "deepspeed"


def kv_dtype_bytes(engine: str, dtype: str) -> int:
    """Bytes per KV element: fp32 under the ORT-GenAI CPU graph, the compute dtype under torch."""
    if engine == "ort-genai":
        return 4
    return 2 if dtype in ("bf16", "fp16") else 4


def auto_slots(cfg: dict[str, Any] | None, engine: str, dtype: str, max_context: int,
               memory_limit_mb: int | None) -> int:
    """Slots for ``max_num_seqs = 0``: as many as ``AUTO_MAX_SEQS`` whose reserved KV fits its
    share of the memory limit (or of the host's RAM), at least 1. The same figure on both sides
    of the runner pipe (the daemon admits it, the runner allocates it)."""
    if not cfg:
        return AUTO_MAX_SEQS
    from lastmile.runtime.generation.engine import ModelShape

    per_slot = max_context * ModelShape.from_config(cfg).kv_bytes_per_token(kv_dtype_bytes(engine, dtype))
    if memory_limit_mb:
        room = memory_limit_mb * (1 << 20) * AUTO_KV_SHARE_OF_LIMIT
    else:
        import psutil

        room = psutil.virtual_memory().total * AUTO_KV_SHARE_OF_RAM
    return int(max(1, min(AUTO_MAX_SEQS, room // max(1, per_slot))))


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """The knobs of one generation model (settings vocabulary names), resolved: the engine
    named, the slots counted. ``precision`` may stay ``auto`` (the runner measures it)."""

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
    max_num_seqs_auto: bool = False

    @classmethod
    def from_settings(cls, settings: Any, model: dict[str, Any] | int | None = None) -> "GenerationSettings":
        """``model`` is the folder's config.json (or only its ``max_position_embeddings``)."""
        def get(name: str, default: Any) -> Any:
            value = getattr(settings, name, None)
            return default if value is None else value

        cfg = model if isinstance(model, dict) else None
        model_max_context = (cfg or {}).get("max_position_embeddings") if cfg is not None else model
        device = get("device", "cpu")
        engine = resolve_engine(get("backend", "auto"), get("engine", "auto"), device)
        dtype = get("dtype", "fp32")
        if engine == "ort-genai" and dtype != "fp32":
            raise _refuse("dtype", f"{dtype!r}: the ort-genai engine's graph computes in fp32 with int4/int8/fp32 "
                          "weights (set precision), or load it with engine deepspeed for bf16")
        max_context = int(get("max_context", 0)) or min(2048, model_max_context or 2048)
        seqs = int(get("max_num_seqs", 0))
        auto = seqs == 0
        if auto:
            seqs = auto_slots(cfg, engine, dtype, max_context, get("memory_limit_mb", None))
        return cls(
            engine=engine, precision=get("precision", "auto"),
            max_num_seqs=seqs, max_context=max_context,
            max_queue=int(get("max_queue", 64)), prefill_chunk=int(get("prefill_chunk", 256)),
            threads=int(get("threads", 0)), device="cpu" if device == "auto" else device,
            dtype=dtype, keep_alive_s=float(get("keep_alive_s", 0.0)), max_num_seqs_auto=auto,
        )
