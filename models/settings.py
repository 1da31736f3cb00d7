"""Per-model settings: one validator shared by the config file's ``[defaults]``, a manifest's
``[settings]``, the ``parameters`` of a load request and a settings patch, so a value is
accepted or refused with the same words wherever it is written. The names, defaults and
bounds come from :mod:`lastmile.models.vocabulary`; this module turns them into checks and
into the :class:`ModelSettings` record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from lastmile.models.vocabulary import (
    BACKENDS,
    BY_NAME,
    DEVICE_KINDS,
    DEVICE_WORDS,
    DTYPES,
    GRAPH_FUSION_LEVELS,
    OFFLOAD_MODES,
    SETTINGS,
    Setting,
)

__all__ = ["BACKENDS", "DTYPES", "GRAPH_FUSION_LEVELS", "OFFLOAD_MODES", "ModelSettings", "SettingError", "VALIDATORS",
           "validate_settings"]


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


def _in_range(setting: Setting, number: type[int] | type[float]) -> Callable[[str, Any], Any]:
    """An int setting takes ints only; a number setting takes ints and floats (as float). Booleans
    are refused although Python counts them as ints."""
    low, high = number(setting.low or 0), number(setting.high or 0)
    accepted = (int,) if number is int else (int, float)

    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, accepted) or not low <= value <= high:
            raise SettingError(key, f"got {value!r}; allowed: {setting.allowed()}")
        return number(value)

    return check


def _device(key: str, value: Any) -> str:
    """``auto``, ``cpu``, or an accelerator name with an optional index (``cuda``, ``cuda:1``, ``npu:0``)."""
    if isinstance(value, str):
        kind, _, index = value.partition(":")
        if value in DEVICE_WORDS or (kind in DEVICE_KINDS and (not index or (index.isascii() and index.isdigit()))):
            return value
    raise SettingError(key, f"got {value!r}; allowed: {BY_NAME['device'].allowed()}")


def _graph_fusion(key: str, value: Any) -> str:
    """A level, or the boolean other servers' ``--enable_graph_fusion`` flags use: true = all."""
    if isinstance(value, bool):
        return "all" if value else "off"
    return _choice(BY_NAME["graph_fusion"].choices)(key, value)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def optional(key: str, value: Any) -> Any:
        return None if value is None else check(key, value)

    return optional


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served. ``None`` in a layer means "not set here": layers are merged
    config defaults < manifest < load parameters with :meth:`overlay`."""

    backend: str = BY_NAME["backend"].default
    device: str = BY_NAME["device"].default
    dtype: str = BY_NAME["dtype"].default
    graph_fusion: str = BY_NAME["graph_fusion"].default
    memory_limit_mb: int | None = BY_NAME["memory_limit_mb"].default
    max_batch_size: int = BY_NAME["max_batch_size"].default
    max_delay_ms: float = BY_NAME["max_delay_ms"].default
    max_queue: int = BY_NAME["max_queue"].default
    instances: int = BY_NAME["instances"].default
    tp_size: int = BY_NAME["tp_size"].default
    offload: str = BY_NAME["offload"].default
    threads: int = BY_NAME["threads"].default
    timeout_s: float = BY_NAME["timeout_s"].default
    load_timeout_s: float = BY_NAME["load_timeout_s"].default
    engine: str = BY_NAME["engine"].default
    precision: str = BY_NAME["precision"].default
    max_num_seqs: int = BY_NAME["max_num_seqs"].default
    max_context: int = BY_NAME["max_context"].default
    keep_alive_s: float = BY_NAME["keep_alive_s"].default

    def overlay(self, changes: Mapping[str, Any]) -> "ModelSettings":
        """A copy with ``changes`` validated and applied (``None`` values are skipped)."""
        clean = validate_settings({k: v for k, v in changes.items() if v is not None})
        return dataclasses.replace(self, **clean)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validator(setting: Setting) -> Callable[[str, Any], Any]:
    """The check for one vocabulary entry."""
    check: Callable[[str, Any], Any]
    if setting.name == "graph_fusion":
        check = _graph_fusion
    elif setting.kind == "choice":
        check = _choice(setting.choices)
    elif setting.kind == "device":
        check = _device
    else:
        check = _in_range(setting, int if setting.kind == "int" else float)
    return _optional(check) if setting.optional else check


VALIDATORS: dict[str, Callable[[str, Any], Any]] = {s.name: _validator(s) for s in SETTINGS}
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
