"""Checks a load must pass before anything that serves is stopped.

A reload that stops the serving runners and then finds the device missing or the artifact
unreadable takes a working model down for a caller's mistake. Everything that can be known
without loading the model is checked here first and refused as a setting or manifest error
(HTTP 4xx), so the only failures left after the old runners stop are the model's own.

Device and dtype facts need torch, DeepSpeed or ONNX Runtime, which the daemon never imports:
:func:`device_problem` runs in a child of the preloaded forkserver, once per
``(backend, device, dtype)`` (devices do not come and go while the daemon runs).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from lastmile.models.errors import ManifestError
from lastmile.models.settings import ModelSettings, SettingError
from lastmile.models.spec import Manifest

logger = logging.getLogger("lastmile.precheck")
ORT_DTYPES = ("fp32", "fp16")
ORT_DEVICE_KINDS = ("cpu", "cuda", "npu")

_cache: dict[tuple[str, str, str], tuple[str, str] | None] = {}
_cache_lock = threading.Lock()


def static_problem(backend: str, settings: ModelSettings) -> tuple[str, str] | None:
    """``(setting, message)`` for what the settings alone rule out (no imports needed)."""
    kind = settings.device.partition(":")[0]
    if backend == "onnxruntime":
        if settings.dtype not in ORT_DTYPES:
            return "dtype", f"the onnxruntime backend serves dtype fp32 or fp16, not {settings.dtype!r}"
        if settings.device != "auto" and kind not in ORT_DEVICE_KINDS:
            return "device", f"the onnxruntime backend runs on cpu, cuda[:N] or npu[:N], not {settings.device!r}"
    return None


def needs_device_probe(backend: str, settings: ModelSettings) -> bool:
    """Whether :func:`device_problem` can say more than :func:`static_problem`: a named
    accelerator, or fp16 on a CPU (DeepSpeed refuses it without native fp16 math)."""
    if settings.device not in ("auto", "cpu"):
        return True
    return backend == "deepspeed" and settings.dtype == "fp16"


def device_problem(backend: str, device: str, dtype: str) -> tuple[str, str] | None:
    """``(setting, message)`` when ``device`` is absent here or cannot run ``backend`` in
    ``dtype``; None when it can. Runs in a forkserver child (imports torch)."""
    from lastmile.runtime.accelerators import resolve_device, split_device
    from lastmile.runtime.backends.base import BackendError

    try:
        resolved = resolve_device(device)
    except BackendError as exc:
        return "device", str(exc)
    kind, _ = split_device(resolved)
    if backend == "onnxruntime" and kind != "cpu":
        import onnxruntime as ort

        provider = {"cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}.get(kind)
        if provider not in ort.get_available_providers():
            return "device", (f"device {device!r} needs ONNX Runtime's {provider}, which this onnxruntime does not have "
                              f"(available: {', '.join(ort.get_available_providers())})")
    if backend == "deepspeed":
        import torch

        if kind == "cpu":
            if dtype == "fp16":
                try:
                    ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
                except Exception:  # noqa: BLE001 - an old torch without the probe: no fp16 on CPU
                    ok = False
                if not ok:
                    return "dtype", ("dtype fp16 on the CPU is refused by DeepSpeed (this CPU has no native fp16 math); "
                                     "use dtype = \"bf16\" or \"fp32\"")
        else:
            from lastmile.runtime.accelerators import ensure_ds_accelerator

            ensure_ds_accelerator()
            from deepspeed.accelerator import get_accelerator

            names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
            supported = [names.get(d, str(d)) for d in get_accelerator().supported_dtypes()]
            if dtype not in supported:
                return "dtype", f"dtype {dtype} is not supported on {resolved}; allowed: {', '.join(supported)}"
    return None


def artifact_problem(manifest: Manifest) -> str | None:
    """Why the artifact cannot be read by the daemon's user now (gone, unreadable, not the
    kind of path its format needs); None when it can be opened."""
    path = Path(manifest.artifact)
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path.name}: {exc.strerror or exc}"
    try:
        if stat.S_ISDIR(st.st_mode):
            os.listdir(path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.read(fd, 1)
            finally:
                os.close(fd)
    except OSError as exc:
        return f"{path.name}: cannot be read: {exc.strerror or exc}"
    return None


def check_load(manifest: Manifest, settings: ModelSettings, backend: str, call_in_forkserver: Any) -> None:
    """Raise :class:`SettingError` (device, dtype) or :class:`ManifestError` (artifact) for a
    load that cannot succeed; blocking (a forkserver child for device facts): run in a thread."""
    problem = static_problem(backend, settings)
    if problem is None and needs_device_probe(backend, settings):
        key = (backend, settings.device, settings.dtype)
        with _cache_lock:
            known = key in _cache
            problem = _cache.get(key)
        if not known:
            try:
                found = call_in_forkserver("lastmile.runtime.precheck", "device_problem", *key, timeout_s=120.0)
            except Exception as exc:  # noqa: BLE001 - the probe itself failed: the load will tell
                logger.warning("device check for %s skipped: %s", key, exc)
            else:
                problem = tuple(found) if found else None  # type: ignore[assignment]
                with _cache_lock:
                    _cache[key] = problem
    if problem is not None:
        setting, message = problem
        raise SettingError(setting, f"model {manifest.name!r}: {message}")
    unreadable = artifact_problem(manifest)
    if unreadable is not None:
        raise ManifestError(manifest.path, "artifact", unreadable)
