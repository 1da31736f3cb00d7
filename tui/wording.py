"""Settings as the operator types them, never as Python prints them: ``--max-batch-size 8
--graph-fusion basic`` and ready ``lastmile load NAME ...`` lines instead of
``{'max_batch_size': 8, ...}``; the memory estimate's parts and the model platforms in words
instead of internal names (``limit_machinery``, ``onnxruntime_onnx``).

Free of Textual, like :mod:`lastmile.tui.forms`; the flag names are the CLI's (``lastmile
load --help``): ``--`` + the setting with dashes, ``--memory-limit`` for ``memory_limit_mb``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lastmile.appliance.client.units import fmt_mib

FLAG_NAMES = {"memory_limit_mb": "--memory-limit"}  # the CLI's exceptions to "--" + dashes

#: the estimate's parts (``POST /lm/v1/memory/estimate``), as docs/memory.md names them
PART_NAMES = {
    "weights": "weights", "workspace": "activations", "pool": "I/O buffers", "overhead": "runner overhead",
    "limit_machinery": "memory-cap overhead", "measured_correction": "measured correction", "kv_cache": "KV cache",
}

#: V2 metadata platforms, as an operator names the runtime
PLATFORMS = {
    "onnxruntime_onnx": "ONNX Runtime", "pytorch_libtorch": "TorchScript", "pytorch_torch": "PyTorch",
    "deepspeed": "DeepSpeed", "onnxruntime_genai": "ONNX Runtime GenAI",
}


def flag(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def flags(settings: Mapping[str, Any]) -> str:
    """``{"max_batch_size": 8, "max_delay_ms": 2.0}`` -> ``--max-batch-size 8 --max-delay-ms 2``."""
    return " ".join(f"{flag(k)} {value_text(v)}" for k, v in settings.items())


def load_line(name: str, settings: Mapping[str, Any]) -> str:
    """A command the operator can paste: ``lastmile load NAME --max-batch-size 8 ...``."""
    rest = flags({k: v for k, v in settings.items() if v is not None})
    return f"lastmile load {name}" + (f" {rest}" if rest else "")


def changes_text(changes: Mapping[str, Any]) -> str:
    """A tune's changes in flags; a limit taken away reads "no memory limit"."""
    parts = [("no memory limit" if k == "memory_limit_mb" and v is None else f"{flag(k)} {value_text(v)}") for k, v in changes.items()]
    return " ".join(parts) or "nothing"


def part_name(key: str) -> str:
    key = key.removesuffix("_bytes")
    return PART_NAMES.get(key, key.replace("_", " "))


def platform_name(platform: Any) -> str:
    return PLATFORMS.get(str(platform), str(platform).replace("_", " ")) if platform else "?"


def option_text(model: str, option: Mapping[str, Any]) -> str:
    """One way a refused load would fit, as the command that takes it."""
    estimate = f" (est {fmt_mib(option['estimate_bytes'])})" if option.get("estimate_bytes") else ""
    if option.get("evict"):
        return "; ".join(f"lastmile unload {victim}" for victim in option["evict"]) + estimate
    if isinstance(option.get("memory"), dict) and option["memory"]:
        return "lastmile memory set " + flags(option["memory"]) + estimate
    if option.get("settings"):
        return load_line(model, option["settings"]) + estimate
    return str(option.get("description") or option.get("option") or "?").replace("_", " ") + estimate
