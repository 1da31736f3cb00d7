"""The ONNX Runtime backend: one ``InferenceSession`` per loaded model.

Choices and why:

- One explicit execution provider from the resolved device, checked after the session is
  built: ONNX Runtime quietly falls back to the CPU when a CUDA/CANN provider fails to load,
  and an operator who sized a model for the GPU must hear about that, not find it in latency.
- ``inter_op_num_threads = 1`` and sequential execution: batches already arrive whole from the
  batcher and several models share the box; parallelism comes from ``intra_op`` threads.
- The CPU arena stays on (steady-state serving allocates nothing), ``arena_extend_strategy =
  kSameAsRequested`` on accelerators so the arena grows by what a batch needs instead of
  doubling past ``memory_limit_mb``; :meth:`shrink` gives the arena back between runs.
- ``dtype = fp16`` on an fp32 graph converts the graph once at load with ONNX Runtime's own
  converter, keeping fp32 inputs/outputs so clients do not change.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.accelerators import resolve_device, split_device
from lastmile.runtime.backends.base import Backend, BackendError
from lastmile.runtime.backends.threads import resolve_threads
from lastmile.runtime.fusion import ORT_LEVEL_NAMES, ort_optimization_level
from lastmile.runtime.memory.units import mib

__all__ = ["OnnxBackend", "ORT_TYPES"]

# ONNX Runtime's type strings -> NumPy dtypes it accepts from Python.
ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}


def _graph_float_type(path: Path) -> str:
    """``"fp32"``, ``"fp16"`` or ``"mixed"``/``"none"``: the float type of the graph's weights,
    read without loading external weight files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kinds = {init.data_type for init in model.graph.initializer}
    f32, f16 = onnx.TensorProto.FLOAT in kinds, onnx.TensorProto.FLOAT16 in kinds
    if f32 and not f16:
        return "fp32"
    if f16 and not f32:
        return "fp16"
    return "mixed" if f32 else "none"


def cast_input(name: str, array: np.ndarray, want: np.dtype) -> np.ndarray:
    """``array`` as ``want`` for input ``name``: as is when it already is; widened when NumPy
    calls the cast safe; a float narrowed to the graph's float type (the model's precision);
    an integer narrowed only when every value fits. Anything else is refused, naming the input,
    so a value is never changed silently. Never writes into ``array``."""
    have = array.dtype
    if have == want:
        return array
    if np.can_cast(have, want, "safe") or (have.kind == "f" and want.kind == "f"):
        return array.astype(want)
    if have.kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)
        if array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max):
            return array.astype(want)
        raise BackendError(
            f"input {name!r}: values from {int(array.min())} to {int(array.max())} do not fit the "
            f"model's {want.name} input"
        )
    raise BackendError(f"input {name!r}: datatype {have.name} cannot be given to a model input of type {want.name}")


class OnnxBackend(Backend):
    """A model served by ONNX Runtime (format ``onnx``)."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, settings: ModelSettings) -> None:
        super().__init__(manifest, settings)
        import onnxruntime as ort

        self._ort = ort
        if settings.dtype not in ("fp32", "fp16"):
            raise BackendError(f"model {manifest.name!r}: onnxruntime backend supports dtype fp32 or fp16, got {settings.dtype!r}")
        self.device = resolve_device(settings.device)
        kind, index = split_device(self.device)
        if kind not in _PROVIDERS:
            raise BackendError(
                f"model {manifest.name!r}: the onnxruntime backend runs on cpu, cuda[:N] or npu[:N]; "
                f"device {self.device!r} is not supported"
            )
        self._kind, self._index = kind, index or 0
        provider = _PROVIDERS[kind]
        available = ort.get_available_providers()
        if provider not in available:
            hint = {"cuda": "install onnxruntime-gpu", "npu": "install an onnxruntime build with CANN"}.get(kind, "")
            raise BackendError(
                f"model {manifest.name!r}: device {self.device!r} needs ONNX Runtime's {provider}, which this "
                f"onnxruntime does not have (available: {', '.join(available)})" + (f"; {hint}" if hint else "")
            )

        options = ort.SessionOptions()
        options.graph_optimization_level = ort_optimization_level(settings.graph_fusion)
        # fatal only: a failed run's error reaches the caller (a 4xx/5xx, the model's last_error)
        # already; ORT's own copy of it went to the daemon log once per failing request
        options.log_severity_level = 4
        self._threads = resolve_threads(settings.threads)  # 0: auto, see lastmile.runtime.backends.threads
        options.intra_op_num_threads = self._threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sleep, don't spin: shared cores
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = True

        provider_options: dict[str, Any] = {}
        limit = mib(settings.memory_limit_mb)
        if kind == "cuda":
            provider_options = {"device_id": self._index, "arena_extend_strategy": "kSameAsRequested"}
            if limit:
                provider_options["gpu_mem_limit"] = limit
        elif kind == "npu":
            provider_options = {"device_id": self._index, "arena_extend_strategy": "kSameAsRequested"}
            if limit:
                provider_options["npu_mem_limit"] = limit
        self._provider_options = provider_options

        path = Path(manifest.artifact)
        if not path.is_file():
            raise BackendError(f"model {manifest.name!r}: ONNX file {path} not found")
        self.graph_dtype = "as exported"  # only inspected when a conversion may be needed
        self.fp16_converted = False
        source: str | bytes = str(path)
        if settings.dtype == "fp16":
            self.graph_dtype = _graph_float_type(path)
            if self.graph_dtype in ("fp32", "mixed"):
                source = self._to_fp16(path)
                self.fp16_converted = True

        try:
            self.session = ort.InferenceSession(source, options, providers=[(provider, provider_options)])
        except Exception as exc:
            what = " after fp16 conversion (try dtype = \"fp32\")" if self.fp16_converted else ""
            raise BackendError(f"model {manifest.name!r}: ONNX Runtime could not load {path.name}{what}: {exc}") from exc
        used = self.session.get_providers()
        if provider not in used:  # ONNX Runtime fell back to the CPU: refuse, never serve it there
            self.session = None
            raise BackendError(
                f"model {manifest.name!r}: {provider} failed to initialise for device {self.device!r} "
                f"(ONNX Runtime used {', '.join(used)}); check the driver/toolkit, or set device = \"cpu\""
            )

        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._input_dtypes: dict[str, np.dtype] = {}
        for meta in self._inputs.values():
            if meta.type not in ORT_TYPES:
                raise BackendError(f"model {manifest.name!r}: input {meta.name!r} has type {meta.type}, not servable over V2")
            self._input_dtypes[meta.name] = ORT_TYPES[meta.type]
        session_outputs = [o.name for o in self.session.get_outputs()]
        specs = list(manifest.outputs)
        if specs and all(s.name in session_outputs for s in specs):
            self._fetch = [s.name for s in specs]
        elif specs and len(specs) == len(session_outputs):
            self._fetch = session_outputs  # manifest renames the outputs: map them in order
        elif not specs:
            self._fetch = session_outputs
        else:
            raise BackendError(
                f"model {manifest.name!r}: manifest outputs {[s.name for s in specs]} do not match the graph's "
                f"outputs {session_outputs}"
            )
        self._out_names = [s.name for s in specs] if specs else session_outputs
        self._out_dtypes = {s.name: s.numpy_dtype for s in specs if s.datatype != "BF16"}
        self._shrink_next = False
        self._lock = threading.Lock()

    def _to_fp16(self, path: Path) -> bytes:
        """The graph converted to fp16 weights/compute, fp32 at its inputs and outputs."""
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            model = onnx.load(str(path))  # with external data: the converter needs the weights
            converted = convert_float_to_float16(model, keep_io_types=True)
            return converted.SerializeToString()
        except Exception as exc:
            raise BackendError(
                f"model {self.manifest.name!r}: dtype fp16: converting the fp32 graph to fp16 failed ({exc}); "
                "use dtype = \"fp32\" or export the model in fp16"
            ) from exc

    # --- serving ----------------------------------------------------------------------------

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise BackendError(f"missing input(s) {missing}; the model takes {list(self._inputs)}")
        extra = [n for n in inputs if n not in self._inputs]
        if extra:
            raise BackendError(f"unknown input(s) {extra}; the model takes {list(self._inputs)}")
        return {n: cast_input(n, np.asarray(inputs[n]), self._input_dtypes[n]) for n in self._inputs}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise BackendError(f"model {self.manifest.name!r} is closed")
        feeds = self._feeds(inputs)
        run_options = None
        with self._lock:
            if self._shrink_next:
                run_options = self._ort.RunOptions()
                run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", self._shrink_spec())
                self._shrink_next = False
        try:
            results = self.session.run(self._fetch, feeds, run_options)
        except Exception as exc:
            raise BackendError(f"model {self.manifest.name!r}: ONNX Runtime failed on this batch: {exc}") from exc
        out: dict[str, np.ndarray] = {}
        for name, value in zip(self._out_names, results):
            value = np.asarray(value)
            want = self._out_dtypes.get(name)
            if want is not None and value.dtype != want:
                value = value.astype(want)
            out[name] = np.ascontiguousarray(value)
        return out

    def _shrink_spec(self) -> str:
        """Which arenas ``memory.enable_memory_arena_shrinkage`` releases: the CPU one always,
        the device one on CUDA (``gpu:N``)."""
        if self._kind == "cuda":
            return f"cpu:0;gpu:{self._index}"
        return "cpu:0"

    def shrink(self) -> None:
        """Give unused arena chunks back now: ONNX Runtime shrinks its arena only at the end of
        a run with ``memory.enable_memory_arena_shrinkage``, so a one-row zero batch is run
        with it (a model that is shedding load gets no other run)."""
        with self._lock:
            self._shrink_next = True
        from lastmile.runtime.runner_main import warmup_inputs

        inputs = warmup_inputs(self.manifest, 1)
        if inputs is not None:
            try:
                self.run(inputs)
            except Exception:  # noqa: BLE001 - shrinking is best effort; the flag stays for the next run
                pass

    def memory(self) -> dict[str, int]:
        # The CPU arena is inside the process RSS, which the runner samples; ONNX Runtime's
        # Python API exposes no per-session device allocator statistics (on CUDA the arena is
        # bounded by gpu_mem_limit instead, shown in info()["provider_options"]).
        return {}

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "providers": self.session.get_providers() if self.session is not None else [],
            "provider_options": {k: v for k, v in self._provider_options.items()},
            "graph_fusion": self.settings.graph_fusion,
            "graph_optimization_level": ORT_LEVEL_NAMES[self.settings.graph_fusion],
            "intra_op_threads": self._threads,
            "intra_op_spinning": False,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "dtype": self.settings.dtype,
            "graph_dtype": self.graph_dtype,
            "fp16_converted": self.fp16_converted,
            "cpu_mem_arena": True,
        }

    def close(self) -> None:
        self.session = None  # the session frees its arenas when the last reference goes
