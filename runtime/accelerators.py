"""What this host has to run models on, and which device a model's ``device`` setting means.

Two jobs:

- :func:`detect` gathers the host facts ``GET /lm/v1/system`` shows (CPU, RAM, accelerators seen
  through DeepSpeed's accelerator abstraction and ONNX Runtime's execution providers,
  library versions). The probing imports torch and DeepSpeed, so the result is cached; only
  the RAM numbers, which change, are re-read on every call.
- :func:`resolve_device` turns ``auto``/``cpu``/``cuda:1``... into a device that exists, or
  refuses with a message the operator can act on. A model never silently lands on the CPU
  when a GPU was asked for.

DeepSpeed picks its accelerator once, on the first ``get_accelerator()``, and its auto-detect
picks ``npu`` whenever ``torch_npu`` imports (and logs a warning on CPU-only hosts).
:func:`ensure_ds_accelerator` pins ``DS_ACCELERATOR`` from what torch itself sees before that
first call; every module of ours that touches DeepSpeed calls it first.
"""

from __future__ import annotations

import copy
import glob
import importlib.metadata
import importlib.util
import os
import platform
import threading
from typing import Any

from lastmile.runtime.backends.base import BackendError

__all__ = ["detect", "resolve_device", "ensure_ds_accelerator", "device_count", "split_device", "device_nodes", "DEVICE_NODE_GLOBS"]

_DEVICE_WORDS = {"cuda": "CUDA", "npu": "Ascend NPU", "xpu": "Intel XPU", "mps": "Apple MPS", "hpu": "Gaudi HPU"}
_lock = threading.Lock()
_static: dict[str, Any] | None = None


#: The device nodes an accelerator's driver creates, by kind (``accel``: the kernel's generic
#: compute-accelerator class). Looking for them costs a ``glob``; asking torch costs seconds of
#: imports and may initialise a driver, which a process that forks afterwards must not do.
DEVICE_NODE_GLOBS = {"cuda": "/dev/nvidia[0-9]*", "npu": "/dev/davinci[0-9]*", "accel": "/dev/accel/accel[0-9]*"}


def device_nodes(*kinds: str) -> list[str]:
    """Accelerator device nodes present on this host, of ``kinds`` (all kinds when none are
    named). Empty: there is nothing to probe, so callers can skip importing torch."""
    found: list[str] = []
    for kind in kinds or tuple(DEVICE_NODE_GLOBS):
        found += glob.glob(DEVICE_NODE_GLOBS[kind])
    return found


def split_device(device: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``, ``"cuda"`` -> ``("cuda", None)``."""
    kind, _, index = device.partition(":")
    return kind, (int(index) if index else None)


def _npu_count() -> int:
    """Ascend NPUs visible through ``torch_npu`` (0 when it is not installed)."""
    if importlib.util.find_spec("torch_npu") is None:
        return 0
    try:
        import torch
        import torch_npu  # noqa: F401  # type: ignore[import-not-found]

        return int(torch.npu.device_count()) if torch.npu.is_available() else 0  # type: ignore[attr-defined]
    except Exception:  # a broken torch_npu install is "no NPU", not a crash of the daemon
        return 0


def device_count(kind: str) -> int:
    """How many devices of ``kind`` torch can use here (``cpu`` is always 1)."""
    import torch

    if kind == "cpu":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "npu":
        return _npu_count()
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return int(xpu.device_count()) if xpu is not None and xpu.is_available() else 0
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    if kind == "hpu":
        hpu = getattr(torch, "hpu", None)
        return int(hpu.device_count()) if hpu is not None and hpu.is_available() else 0
    return 0


def ensure_ds_accelerator() -> str:
    """Pin ``DS_ACCELERATOR`` (unless the operator set it) and return it.

    ``cuda`` when torch sees a CUDA device, else ``npu`` when torch_npu sees one, else ``cpu``.
    Must run before DeepSpeed's first ``get_accelerator()`` in the process: later it has no
    effect (DeepSpeed caches its choice).
    """
    chosen = os.environ.get("DS_ACCELERATOR")
    if chosen:
        return chosen
    import torch

    if torch.cuda.is_available():
        chosen = "cuda"
    elif _npu_count() > 0:
        chosen = "npu"
    else:
        chosen = "cpu"
    os.environ["DS_ACCELERATOR"] = chosen
    return chosen


def resolve_device(setting: str) -> str:
    """The device a model with ``device = setting`` runs on.

    ``auto`` -> ``cuda`` when torch sees a CUDA device, else ``npu`` when there is one, else
    ``cpu``. An explicit device that is not here -> :class:`BackendError` (never a silent
    fallback to the CPU: the operator sized the model for the accelerator).
    """
    if setting == "auto":
        if device_count("cuda"):
            return "cuda"
        if device_count("npu"):
            return "npu"
        return "cpu"
    if setting == "cpu":
        return "cpu"
    kind, index = split_device(setting)
    words = _DEVICE_WORDS.get(kind)
    if words is None:
        raise BackendError(f"device {setting!r} is not a device lastmile knows; use cpu, auto, cuda[:N] or npu[:N]")
    count = device_count(kind)
    if count == 0:
        raise BackendError(
            f"device {setting!r} requested but no {words} device is available; use device = \"cpu\" or \"auto\""
        )
    if index is not None and index >= count:
        raise BackendError(
            f"device {setting!r} requested but only {count} {words} device(s) are available "
            f"({kind}:0..{kind}:{count - 1}); use one of those, \"cpu\" or \"auto\""
        )
    return setting


# --- detect() -------------------------------------------------------------------------------


def _cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    """An installed distribution's version without importing it (``None`` when absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _deepspeed_accelerator() -> dict[str, Any]:
    """Name, device count and per-device memory as DeepSpeed's accelerator reports them."""
    ensure_ds_accelerator()
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        name = acc.device_name()
        count = int(acc.device_count())
        devices: list[dict[str, Any]] = []
        for i in range(count if name != "cpu" else 0):
            entry: dict[str, Any] = {"index": i, "device": f"{name}:{i}"}
            try:
                entry["total_memory_bytes"] = int(acc.total_memory(i))
            except Exception:  # not every accelerator reports it
                entry["total_memory_bytes"] = None
            if name == "cuda":
                import torch

                entry["name"] = torch.cuda.get_device_name(i)
            devices.append(entry)
        out: dict[str, Any] = {
            "name": name,
            "device_count": count,
            "devices": devices,
            "supported_dtypes": [str(d).removeprefix("torch.") for d in acc.supported_dtypes()],
        }
        if name == "cpu":
            # DeepSpeed's CPU accelerator counts NUMA nodes as devices and reports host RAM as
            # their memory; say so rather than list the RAM twice as "device memory".
            out["note"] = "cpu accelerator: device_count is NUMA nodes; memory is host RAM"
        return out
    except Exception as exc:  # a broken DeepSpeed must not take GET /lm/v1/system down
        return {"name": None, "device_count": 0, "devices": [], "error": f"{type(exc).__name__}: {exc}"}


def _ort_providers() -> list[str] | dict[str, str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _static_facts() -> dict[str, Any]:
    import psutil

    physical = psutil.cpu_count(logical=False)
    cpu = {
        "model": _cpu_model(),
        "arch": platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": physical,
    }
    try:
        cpu["usable_cores"] = len(os.sched_getaffinity(0))  # what this process may run on (cgroups, taskset)
    except (AttributeError, OSError):
        cpu["usable_cores"] = cpu["logical_cores"]
    devices = ["cpu"]
    for kind in ("cuda", "npu"):
        devices += [f"{kind}:{i}" for i in range(device_count(kind))]
    return {
        "cpu": cpu,
        "accelerators": {
            "devices": devices,
            "default_device": resolve_device("auto"),
            "deepspeed": _deepspeed_accelerator(),
            "onnxruntime_providers": _ort_providers(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "deepspeed": _version("deepspeed"),
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "numpy": _version("numpy"),
            "transformers": _version("transformers"),
        },
    }


def detect(*, refresh: bool = False) -> dict[str, Any]:
    """Host facts for ``GET /lm/v1/system`` (a fresh dict each call; safe to mutate).

    The probe (torch, DeepSpeed, ONNX Runtime) runs once per process; ``ram`` is re-read each
    call. ``refresh=True`` probes again (after a hot-plugged device, in tests).
    """
    global _static
    import psutil

    with _lock:
        if _static is None or refresh:
            _static = _static_facts()
        facts = copy.deepcopy(_static)
    vm = psutil.virtual_memory()
    facts["ram"] = {"total_bytes": int(vm.total), "available_bytes": int(vm.available)}
    return facts
