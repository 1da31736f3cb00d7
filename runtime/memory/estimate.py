"""How much memory a model will need, per device, before it is loaded.

An estimate is the sum of four parts, each shown to the operator (``lastmile load --dry-run``,
``POST /lm/v1/memory/estimate``, refusals) so a wrong one can be traced to its part:

- ``weights``: the artifact's parameter bytes at the serving dtype. ONNX: the graph's
  initializers (exact, per data type, external data included) read with ``onnx`` without
  loading the weights; torch.export / TorchScript archives: the sizes of the tensor-data
  entries of the zip (``data/...``; no unpickling); Hugging Face folders: the safetensors
  headers. Weights stored as fp32 and served as fp16/bf16 count half.
- ``workspace``: activations for one batch of ``max_batch_size`` rows: the inputs' and
  outputs' bytes per row (variable dims counted as 1, as the runner's warm-up does) times
  :data:`WORKSPACE_FACTOR`. Requests with longer variable dims need more: the runtime
  accounting and the mitigation ladder see that, the estimate cannot.
- ``pool``: the shared-memory buffers of one batch in and out (power-of-two size classes), two
  of each per instance (the batcher fills one while the runner answers another).
- ``overhead``: what a runner process costs on top of that, per backend, *measured* on this
  appliance (``python -m lastmile.runtime.memory.measure_overhead``; figures and method in
  docs/memory.md).
- ``limit_machinery``: what the hard cap's own machinery costs a runner with a
  ``memory_limit_mb`` (one malloc arena and a fixed mmap threshold; measured per backend,
  :data:`LIMIT_MACHINERY_BYTES`).
- ``measured_correction``: once a model has been loaded, what its runners really used minus
  what this module estimated for the same artifact (content hash) and settings
  (:mod:`lastmile.runtime.memory.footprints`); 0 for an artifact never loaded here.
  The factor :data:`WEIGHT_FACTOR` covers what a backend holds beyond one copy of the weights
  (ORT keeps the graph proto and prepacked MatMul weights; torch.export keeps the archive's
  buffers while building the module).

Everything here is pure and cheap (no torch import): it runs in the daemon for every load.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.memory.units import MiB
from lastmile.runtime.shm import size_class



# Measured with ``python -m lastmile.runtime.memory.measure_overhead`` on the development appliance (2-core
# x86-64, torch 2.13 CPU, onnxruntime 1.32, deepspeed 0.19.8): the runner's USS at "ready"
# minus its weights, over the demo models and a 64 MiB synthetic MLP (see docs/memory.md).
BACKEND_OVERHEAD_BYTES: dict[tuple[str, str], int] = {
    ("onnxruntime", "onnx"): 10 * MiB,  # measured 8.5-9.1 MiB in the daemon
    ("deepspeed", "torch_export"): 36 * MiB,  # measured 30.8-37.2 MiB
    ("deepspeed", "torchscript"): 14 * MiB,  # measured 13.6 MiB
    ("deepspeed", "hf"): 60 * MiB,  # assumed: measure_overhead covers no HF-folder model yet
    ("deepspeed", "torch_pickle"): 40 * MiB,  # same code path as torch_export after loading
}
# USS with a memory_limit_mb minus without one, same model: measure_overhead --limit-mb 1000 at
# "ready" -0.4 to +0.1 MiB over the five demo models; in the daemon after 20 mixed requests,
# demo-lm 11.9 MiB limited vs 12.3 unlimited. The cap itself (gc.freeze, one malloc arena) costs
# less than the noise here; 1 MiB keeps a margin for the mmap threshold under concurrent batches.
LIMIT_MACHINERY_BYTES: dict[str, int] = {"onnxruntime": 1 * MiB, "deepspeed": 1 * MiB}
# Resident bytes per weight byte once ready (measured as above on the 64 MiB MLP).
# ONNX Runtime keeps the graph's initializers *and* its own (prepacked) copies: 1.96 measured.
WEIGHT_FACTOR: dict[str, float] = {"onnxruntime": 2.0, "deepspeed": 1.04}
# Activation bytes per input+output byte of a batch: demo-lm under ONNX Runtime at batch
# 256 x 64 tokens grew 86 MiB past "ready" for 16.9 MiB of inputs+outputs (5.1x).
WORKSPACE_FACTOR = 5.0
# A CUDA context and the kernels' workspace per process: not measurable on this CPU-only
# appliance; the figure commonly seen for torch 2.x on recent GPUs, documented as assumed.
DEVICE_CONTEXT_BYTES = 500 * MiB
# ZeRO-Inference offload keeps every parameter on the host and fetches one layer at a time
# to the device: the device part of the weights is about the largest layer's share.
ZERO_DEVICE_WEIGHT_SHARE = 0.1

_FLOAT_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_ONNX_FLOATS = {1: 4, 10: 2, 16: 2, 11: 8}  # FLOAT, FLOAT16, BFLOAT16, DOUBLE
_SAFETENSORS_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SAFETENSORS_FLOATS = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class Weights:
    """Parameter bytes of an artifact as stored: ``float_bytes`` (at ``float_itemsize``) can
    change with the dtype, ``other_bytes`` (integer tables, masks) cannot."""

    float_bytes: int
    other_bytes: int
    float_itemsize: int = 4
    source: str = ""

    def at(self, dtype: str) -> int:
        """Bytes when served at ``dtype`` (fp32/fp16/bf16)."""
        want = _FLOAT_ITEMSIZE.get(dtype, 4)
        return int(self.float_bytes * want / self.float_itemsize) + self.other_bytes


def artifact_weights(manifest: Manifest) -> Weights:
    """What :class:`Weights` the artifact holds, read without loading it."""
    path = Path(manifest.artifact)
    try:
        if manifest.format == "onnx":
            return _onnx_weights(path)
        if manifest.format in ("torch_export", "torchscript", "torch_pickle") and zipfile.is_zipfile(path):
            return _zip_weights(path)
        if manifest.format == "hf":
            return _hf_weights(path if path.is_dir() else path.parent)
    except Exception as exc:  # noqa: BLE001 - fall back to the file size, and say so
        size = _bytes_on_disk(path)
        return Weights(size, 0, 4, f"size on disk ({type(exc).__name__} reading the artifact: {exc})")
    return Weights(_bytes_on_disk(path), 0, 4, "size on disk")


def _bytes_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _onnx_weights(path: Path) -> Weights:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = other = 0
    itemsize_seen: dict[int, int] = {}
    for init in model.graph.initializer:
        count = math.prod(init.dims) if init.dims else 1
        size = count * _ONNX_ITEMSIZE.get(init.data_type, 4)
        if init.data_type in _ONNX_FLOATS:
            floats += size
            itemsize_seen[_ONNX_FLOATS[init.data_type]] = itemsize_seen.get(_ONNX_FLOATS[init.data_type], 0) + size
        else:
            other += size
    itemsize = max(itemsize_seen, key=itemsize_seen.get) if itemsize_seen else 4
    return Weights(floats, other, itemsize, f"onnx initializers ({len(model.graph.initializer)})")


def _zip_weights(path: Path) -> Weights:
    """torch.save/torch.export/torch.jit archives keep each storage as an entry under
    ``<root>/data/`` (torch.export: ``data/weights/``, ``data/constants/``); dtypes are inside
    the pickle, so they are counted as fp32 (what the demo and most exports hold)."""
    with zipfile.ZipFile(path) as zf:
        total = 0
        entries = 0
        for info in zf.infolist():
            parts = info.filename.split("/")
            if "data" in parts[:-1] or (len(parts) >= 2 and parts[-2] == "data"):
                if "sample_inputs" in parts or info.filename.endswith((".pkl", ".json", "version", "byteorder")):
                    continue
                total += info.file_size
                entries += 1
    return Weights(total, 0, 4, f"tensor entries of the archive ({entries})")


def _hf_weights(folder: Path) -> Weights:
    floats = other = 0
    files = sorted(folder.glob("*.safetensors"))
    itemsize = 4
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            size = math.prod(meta["shape"]) * _SAFETENSORS_ITEMSIZE.get(meta["dtype"], 4)
            if meta["dtype"] in _SAFETENSORS_FLOATS:
                floats += size
                itemsize = _SAFETENSORS_ITEMSIZE[meta["dtype"]]
            else:
                other += size
    if not files:
        return Weights(_bytes_on_disk(folder), 0, 4, "size on disk (no safetensors files)")
    return Weights(floats, other, itemsize, f"safetensors headers ({len(files)} files)")


def io_bytes_per_row(manifest: Manifest) -> tuple[int, int]:
    """Input and output bytes of one row, variable dims counted as 1."""

    def row(specs: Any) -> int:
        total = 0
        for spec in specs:
            dims = [1 if d < 0 else d for d in spec.shape[1:]]
            itemsize = spec.numpy_dtype.itemsize if spec.datatype != "BYTES" else 64
            total += math.prod(dims) * itemsize
        return total

    return row(manifest.inputs), row(manifest.outputs)


@dataclass
class Estimate:
    """Bytes a load will take, per part and per device (``host`` and e.g. ``cuda:0``)."""

    model: str
    backend: str
    device: str
    settings: dict[str, Any]
    weights_bytes: int
    workspace_bytes: int
    pool_bytes: int
    overhead_bytes: int
    per_device: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    limit_machinery_bytes: int = 0
    measured_correction_bytes: int = 0
    source: str = "static"  # "measured" once corrected by a recorded footprint
    artifact_key: str | None = None  # the footprint record this estimate reads and the load writes
    kind: str = "tensor"  # "generation": KV-cache sizing (runtime/generation/memory.py), held to the limit itself

    def corrected(self, delta_bytes: int, note: str) -> "Estimate":
        """This estimate with ``delta_bytes`` added on the host (a recorded footprint's
        error), never below the parts that are certain to be there (pool + limit machinery)."""
        host = self.per_device.get("host", 0)
        floor = self.pool_bytes + self.limit_machinery_bytes
        delta = max(delta_bytes, floor - host)
        return Estimate(
            model=self.model, backend=self.backend, device=self.device, settings=self.settings,
            weights_bytes=self.weights_bytes, workspace_bytes=self.workspace_bytes, pool_bytes=self.pool_bytes,
            overhead_bytes=self.overhead_bytes, per_device={**self.per_device, "host": host + delta},
            notes=[*self.notes, note], limit_machinery_bytes=self.limit_machinery_bytes,
            measured_correction_bytes=self.measured_correction_bytes + delta, source="measured",
            artifact_key=self.artifact_key,
        )

    @property
    def total_bytes(self) -> int:
        return sum(self.per_device.values())

    @property
    def host_bytes(self) -> int:
        return self.per_device.get("host", 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "settings": self.settings,
            "total_bytes": self.total_bytes,
            "source": self.source,
            "parts": {
                "weights_bytes": self.weights_bytes,
                "workspace_bytes": self.workspace_bytes,
                "pool_bytes": self.pool_bytes,
                "overhead_bytes": self.overhead_bytes,
                "limit_machinery_bytes": self.limit_machinery_bytes,
                "measured_correction_bytes": self.measured_correction_bytes,
            },
            "per_device": dict(self.per_device),
            "notes": list(self.notes),
        }


def budget_device(device: str) -> str:
    """The budget a device's memory counts against: ``host`` for the CPU, ``cuda:0`` for
    ``cuda`` (index 0 when none is given)."""
    if device in ("cpu", "auto", "host"):
        return "host"
    kind, _, index = device.partition(":")
    return f"{kind}:{index or 0}"


def estimate(manifest: Manifest, settings: ModelSettings, backend: str, device: str, weights: Weights | None = None) -> Estimate:
    """The :class:`Estimate` for loading ``manifest`` with ``settings`` on resolved ``device``."""
    weights = weights or artifact_weights(manifest)
    dtype = settings.dtype
    w_bytes = int(weights.at(dtype) * WEIGHT_FACTOR.get(backend, 1.0))
    in_row, out_row = io_bytes_per_row(manifest)
    batch = settings.max_batch_size
    if dtype in ("fp16", "bf16"):
        # activations in the compute dtype: about half of fp32 ones
        workspace = int(batch * (in_row + out_row) * WORKSPACE_FACTOR / 2)
    else:
        workspace = int(batch * (in_row + out_row) * WORKSPACE_FACTOR)
    pool = settings.instances * 2 * (size_class(batch * in_row + 64) + size_class(batch * out_row + 64))
    overhead = BACKEND_OVERHEAD_BYTES.get((backend, manifest.format), 40 * MiB) * settings.instances
    notes = [f"weights from {weights.source}, served as {dtype}"]
    if any(d < 0 for s in (*manifest.inputs, *manifest.outputs) for d in s.shape[1:]):
        notes.append("variable non-batch dims counted as 1: longer requests need more workspace")
    target = budget_device(device)
    per_device: dict[str, int] = {}
    machinery = 0
    if target == "host" and settings.memory_limit_mb:
        machinery = LIMIT_MACHINERY_BYTES.get(backend, 1 * MiB) * settings.instances
        notes.append(f"memory_limit_mb set: {machinery / MiB:g} MiB for the hard cap's allocator settings (measured)")
    if target == "host":
        per_device["host"] = w_bytes * settings.instances + workspace * settings.instances + pool + overhead + machinery
    else:
        on_device = w_bytes
        host_weights = 0
        if settings.offload == "cpu":
            on_device = int(w_bytes * ZERO_DEVICE_WEIGHT_SHARE)
            host_weights = w_bytes
            notes.append("ZeRO-Inference offload: weights kept in host memory, one layer at a time on the device")
        per_device[target] = (on_device + workspace + DEVICE_CONTEXT_BYTES) * settings.instances
        per_device["host"] = (host_weights * settings.instances) + pool + overhead
        notes.append(f"device context {DEVICE_CONTEXT_BYTES // MiB} MiB assumed (not measurable on a CPU-only box)")
    return Estimate(
        model=manifest.name, backend=backend, device=device, settings=settings.as_dict(),
        weights_bytes=w_bytes * settings.instances, workspace_bytes=workspace * settings.instances,
        pool_bytes=pool, overhead_bytes=overhead, per_device=per_device, notes=notes, limit_machinery_bytes=machinery,
    )
