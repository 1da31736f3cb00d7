"""Per-model settings: one vocabulary and one validator shared by the config file's
``[defaults]``, a manifest's ``[settings]`` and the ``parameters`` of a load request, so a
value is accepted or refused with the same words wherever it is written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

BACKENDS = ("auto", "deepspeed", "onnxruntime")
DTYPES = ("fp32", "fp16", "bf16")
GRAPH_FUSION_LEVELS = ("off", "basic", "extended", "all")
OFFLOAD_MODES = ("none", "cpu")


class SettingError(ValueError):
    """A setting's value is not allowed; ``key`` names it and the message says what is."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise SettingError(key, f"got {value!r}; allowed: {', '.join(allowed)}")
        return value

    return check


def _int_range(low: int, high: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SettingError(key, f"got {value!r}; allowed: an integer from {low} to {high}")
        return value

    return check


def _number_range(low: float, high: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise SettingError(key, f"got {value!r}; allowed: a number from {low} to {high}")
        return float(value)

    return check


def _device(key: str, value: Any) -> str:
    """``auto``, ``cpu``, or an accelerator name with an optional index (``cuda``, ``cuda:1``, ``npu:0``)."""
    if isinstance(value, str):
        kind, _, index = value.partition(":")
        if value in ("auto", "cpu") or (
            kind in ("cuda", "npu", "xpu", "mps", "hpu") and (not index or (index.isascii() and index.isdigit()))
        ):
            return value
    raise SettingError(key, f"got {value!r}; allowed: auto, cpu, cuda, cuda:N, npu, npu:N, xpu, mps, hpu")


def _graph_fusion(key: str, value: Any) -> str:
    """A level, or the boolean other servers' ``--enable_graph_fusion`` flags use: true = all."""
    if isinstance(value, bool):
        return "all" if value else "off"
    return _choice(GRAPH_FUSION_LEVELS)(key, value)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def optional(key: str, value: Any) -> Any:
        return None if value is None else check(key, value)

    return optional


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served. ``None`` in a layer means "not set here": layers are merged
    config defaults < manifest < load parameters with :meth:`overlay`."""

    backend: str = "auto"
    device: str = "auto"
    dtype: str = "fp32"
    graph_fusion: str = "basic"
    memory_limit_mb: int | None = None
    max_batch_size: int = 8
    max_delay_ms: float = 2.0
    max_queue: int = 256
    instances: int = 1
    tp_size: int = 1
    offload: str = "none"
    threads: int = 0  # 0: let the backend pick (intra-op threads = physical cores)
    timeout_s: float = 30.0  # per request, queueing included
    load_timeout_s: float = 600.0  # a load (or restart) taking longer is killed and reported

    def overlay(self, changes: Mapping[str, Any]) -> "ModelSettings":
        """A copy with ``changes`` validated and applied (``None`` values are skipped)."""
        clean = validate_settings({k: v for k, v in changes.items() if v is not None})
        return dataclasses.replace(self, **clean)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "backend": _choice(BACKENDS),
    "device": _device,
    "dtype": _choice(DTYPES),
    "graph_fusion": _graph_fusion,
    "memory_limit_mb": _optional(_int_range(16, 16 * 1024 * 1024)),
    "max_batch_size": _int_range(1, 4096),
    "max_delay_ms": _number_range(0.0, 10_000.0),
    "max_queue": _int_range(1, 1_000_000),
    "instances": _int_range(1, 64),
    "tp_size": _int_range(1, 64),
    "offload": _choice(OFFLOAD_MODES),
    "threads": _int_range(0, 1024),
    "timeout_s": _number_range(0.001, 3600.0),
    "load_timeout_s": _number_range(1.0, 86_400.0),
}
assert set(VALIDATORS) == {f.name for f in fields(ModelSettings)}


def validate_settings(values: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Check every key and value; unknown keys are errors. ``prefix`` is put before each key in
    error messages (e.g. ``defaults.``) so the operator can find it in the file."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        check = VALIDATORS.get(key)
        if check is None:
            raise SettingError(prefix + key, f"unknown setting; known: {', '.join(sorted(VALIDATORS))}")
        clean[key] = check(prefix + key, value)
    return clean
