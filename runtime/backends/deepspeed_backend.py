"""The DeepSpeed backend: a torch module wrapped by DeepSpeed's inference engine (or, with
``offload = "cpu"``, by a ZeRO-3 engine that keeps the weights in host memory).

Loading, by format (what may run code is said next to it):

- ``torch_export`` (``.pt2``): ``torch.export.load(path).module()``: no pickled code.
- ``torchscript``: ``torch.jit.load(path, map_location="cpu")``: TorchScript code, no pickle of
  Python objects. Wrapped in a thin ``nn.Module`` because DeepSpeed converts dtypes with
  ``module.half()/.bfloat16()``, which ScriptModules refuse.
- ``hf``: a Hugging Face folder through ``transformers`` (the ``hf`` extra), safetensors
  weights only, local files only, no remote code.
- ``torch_pickle``: ``torch.load(weights_only=False)`` runs the pickle's code, so only when the
  manifest says ``trust_pickle = true``.

Then ``deepspeed.init_inference(module, dtype=..., replace_with_kernel_inject=...,
tensor_parallel={"tp_size": ...})``, always with an explicit ``dtype`` (DeepSpeed's default is
fp16, which its CPU accelerator refuses). Forward passes run under ``torch.inference_mode()``
(``torch.no_grad()`` for ZeRO, whose parameter gathering must not create inference tensors).

Inputs: ``torch.from_numpy`` shares memory with the (possibly read-only shared-memory) batch
when the model cannot write into its inputs: a torch.export program without input mutations.
TorchScript, Hugging Face and pickled modules are Python/TorchScript code that may write into
an input in place, so their inputs are copied once (``info()["input_copy"]`` says which).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest, TensorSpec
from lastmile.runtime.accelerators import ensure_ds_accelerator, resolve_device, split_device
from lastmile.runtime.backends.base import Backend, BackendError
from lastmile.runtime.backends.threads import resolve_threads
from lastmile.runtime.fusion import TorchFusionPlan, torch_fusion_plan
from lastmile.runtime.memory.units import mib

__all__ = ["DeepSpeedBackend", "zero_env"]

_READONLY_WARNING = "The given NumPy array is not writable"
_NUMPY_FLOATS: dict[str, Any] = {}  # numpy float dtype name -> torch dtype, filled on first load


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _spec_torch_dtype(spec: TensorSpec):
    import torch

    return {
        "FP32": torch.float32, "FP16": torch.float16, "FP64": torch.float64, "BF16": torch.bfloat16,
        "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
        "UINT8": torch.uint8, "BOOL": torch.bool,
    }.get(spec.datatype)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero_env() -> dict[str, str]:
    """Set the torch.distributed variables a single-process ZeRO engine needs (rank 0 of 1,
    a free loopback port), keeping any the launcher already set. Returns what is in effect."""
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    return {k: os.environ[k] for k in (*defaults, "MASTER_PORT")}


def _wrap_script_module(script_module: Any) -> Any:
    """A plain ``nn.Module`` around a ScriptModule: ``.bfloat16()``/``.half()`` work on it
    (they raise on a ScriptModule; ``_apply`` reaches the child's parameters all the same)."""
    import torch

    class TorchScriptModel(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner(*args, **kwargs)

    return TorchScriptModel(script_module)


class DeepSpeedBackend(Backend):
    """A model served by DeepSpeed (formats torch_export, torchscript, hf, torch_pickle)."""

    name = "deepspeed"

    def __init__(self, manifest: Manifest, settings: ModelSettings) -> None:
        super().__init__(manifest, settings)
        self.accelerator_name = ensure_ds_accelerator()  # before DeepSpeed's first get_accelerator()
        import torch

        self._torch = torch
        _NUMPY_FLOATS.update(float16=torch.float16, float32=torch.float32, float64=torch.float64)
        self.device = resolve_device(settings.device)
        self._kind, index = split_device(self.device)
        self._index = index or 0
        self.zero = settings.offload == "cpu"
        self._notes: list[str] = []
        self._engine: Any = None
        self._module: Any = None

        from deepspeed.accelerator import get_accelerator

        self._acc = get_accelerator()
        acc_name = self._acc.device_name()
        if self._kind != "cpu" and self._kind != acc_name:
            raise BackendError(
                f"model {manifest.name!r}: device {self.device!r} requested but DeepSpeed's accelerator in this "
                f"process is {acc_name!r} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r})"
            )
        self._on_host_only = self._kind == "cpu" and acc_name != "cpu"  # CPU model on a GPU host
        if self.zero and self._on_host_only:
            raise BackendError(
                f"model {manifest.name!r}: offload = \"cpu\" keeps weights in host memory for a model on an "
                f"accelerator; with device = \"cpu\" the model is in host memory already: use offload = \"none\""
            )
        self.dtype = self._check_dtype(settings.dtype)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if settings.tp_size != world:
            raise BackendError(
                f"model {manifest.name!r}: tp_size {settings.tp_size} needs {settings.tp_size} runner processes "
                f"(one per rank, started with WORLD_SIZE={settings.tp_size}); this runner has WORLD_SIZE={world}"
            )
        torch.set_num_threads(resolve_threads(settings.threads))  # 0: auto, see lastmile.runtime.backends.threads
        if self._kind == "cuda":
            torch.cuda.set_device(self._index)  # DeepSpeed places the module on the current device
            if settings.memory_limit_mb:
                total = torch.cuda.get_device_properties(self._index).total_memory
                fraction = min(1.0, mib(settings.memory_limit_mb) / total)
                torch.cuda.set_per_process_memory_fraction(fraction, self._index)
                self._notes.append(f"CUDA caching allocator capped at {fraction:.3f} of device memory")

        self.plan: TorchFusionPlan = torch_fusion_plan(settings.graph_fusion, self._kind, manifest.format,
                                                       zero_offload=self.zero)
        module = self._load_module()
        self._input_copy = self._needs_input_copy(module)
        try:
            if self.zero:
                self._init_zero(module)
            else:
                self._init_inference(module)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"model {manifest.name!r}: DeepSpeed could not initialise the model: "
                               f"{type(exc).__name__}: {exc}") from exc
        self._out_specs = list(manifest.outputs)
        self._lock = threading.Lock()

    # --- loading ----------------------------------------------------------------------------

    def _check_dtype(self, name: str) -> Any:
        torch = self._torch
        if name not in ("fp32", "fp16", "bf16"):
            raise BackendError(f"model {self.manifest.name!r}: dtype {name!r}; allowed: fp32, fp16, bf16")
        dtype = _torch_dtypes()[name]
        if self._kind == "cpu":
            fp16_ok = False
            try:
                fp16_ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
            except Exception:
                pass
            if name == "fp16" and not fp16_ok:
                raise BackendError(
                    f"model {self.manifest.name!r}: dtype fp16 on the CPU is refused by DeepSpeed (this CPU has no "
                    "native fp16 math, AVX512-FP16/AMX-FP16); use dtype = \"bf16\" or \"fp32\""
                )
        elif dtype not in self._acc.supported_dtypes():
            allowed = ", ".join({torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(d, str(d))
                                for d in self._acc.supported_dtypes())
            raise BackendError(f"model {self.manifest.name!r}: dtype {name} is not supported on {self.device}; allowed: {allowed}")
        return dtype

    def _load_module(self) -> Any:
        torch = self._torch
        fmt, path = self.manifest.format, Path(self.manifest.artifact)
        if not path.exists():
            raise BackendError(f"model {self.manifest.name!r}: artifact {path} not found")
        self._exported: Any = None
        try:
            if fmt == "torch_export":
                self._exported = torch.export.load(str(path))
                return self._exported.module()
            if fmt == "torchscript":
                if self.zero:
                    raise BackendError(
                        f"model {self.manifest.name!r}: offload = \"cpu\" (ZeRO-Inference) cannot serve a TorchScript "
                        "module: ZeRO-3 fetches each layer's weights in forward hooks, which ScriptModules do not "
                        "take; use a torch.export .pt2 or Hugging Face folder, or offload = \"none\""
                    )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
                    script = torch.jit.load(str(path), map_location="cpu").eval()
                return _wrap_script_module(script)
            if fmt == "hf":
                return self._load_hf(path)
            if fmt == "torch_pickle":
                if not self.manifest.trust_pickle:
                    raise BackendError(
                        f"model {self.manifest.name!r}: format torch_pickle runs the code inside the pickle when "
                        f"loaded; refused unless model.toml sets trust_pickle = true (re-export it as a .pt2 or ONNX "
                        "file instead: those hold no code)"
                    )
                obj = torch.load(str(path), map_location="cpu", weights_only=False)  # trusted by the operator
                if not isinstance(obj, torch.nn.Module):
                    raise BackendError(
                        f"model {self.manifest.name!r}: {path.name} holds a {type(obj).__name__}, not a whole "
                        "nn.Module (a state_dict needs its model class: export the model instead)"
                    )
                return obj.eval()
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"model {self.manifest.name!r}: could not load {fmt} artifact {path.name}: "
                               f"{type(exc).__name__}: {exc}") from exc
        raise BackendError(f"model {self.manifest.name!r}: the deepspeed backend does not load format {fmt!r}")

    def _load_hf(self, folder: Path) -> Any:
        try:
            import transformers
        except ImportError as exc:
            raise BackendError(
                f"model {self.manifest.name!r}: Hugging Face folders need the transformers package: install the "
                "`hf` extra (pip install 'lastmile[hf]')"
            ) from exc
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        cls = transformers.AutoModel
        for arch in getattr(config, "architectures", None) or []:
            if hasattr(transformers, arch):
                cls = getattr(transformers, arch)
                break
        model = cls.from_pretrained(str(folder), config=config, local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False)
        return model.eval()

    def _needs_input_copy(self, module: Any) -> bool:
        """Whether inputs must be copied before the forward (see the module docstring)."""
        if self._exported is not None:
            return bool(self._exported.graph_signature.user_inputs_to_mutate)
        return True

    def _init_inference(self, module: Any) -> None:
        import deepspeed

        torch = self._torch
        if self.plan.freeze_torchscript:
            # Freezing bakes the weights into the graph as constants, which a later dtype change
            # cannot reach: convert first, then freeze.
            inner = module.inner.to(self.dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # still the tool for TorchScript
                frozen = torch.jit.freeze(inner)
                if self.plan.optimize_for_inference:
                    frozen = torch.jit.optimize_for_inference(frozen)
            module = _wrap_script_module(frozen)
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "replace_with_kernel_inject": self.plan.kernel_inject,
            "tensor_parallel": {"tp_size": self.settings.tp_size},
        }
        if self._on_host_only:
            kwargs["keep_module_on_host"] = True
        self._engine = deepspeed.init_inference(module, **kwargs)
        self._module = self._engine
        if self.plan.kernel_inject:
            replaced = sum(1 for m in self._engine.module.modules() if type(m).__module__.startswith("deepspeed."))
            self._notes.append(f"DeepSpeed kernel injection replaced {replaced} module(s)")

    def _init_zero(self, module: Any) -> None:
        import deepspeed
        import deepspeed.ops

        os.environ.setdefault("LOCAL_RANK", str(self._index))  # the ZeRO engine binds to device LOCAL_RANK
        env = zero_env()
        if env["WORLD_SIZE"] == "1" and self._acc.device_name() == "cpu":
            # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce kernel on
            # first use (about a minute, a C++ compiler on the appliance); it only speeds up
            # reductions *between* ranks on one host, and a one-process engine has none.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            self._notes.append("single rank: DeepSpeed's shared-memory comm kernel not built (no peers)")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}},
            "bf16": {"enabled": self.settings.dtype == "bf16"},
            "fp16": {"enabled": self.settings.dtype == "fp16"},
        }
        if self.settings.dtype == "bf16":
            module = module.to(self.dtype)
        elif self.settings.dtype == "fp16":
            module = module.half()
        engine, *_ = deepspeed.initialize(model=module, config=config)
        try:
            engine.module.eval()
        except NotImplementedError:
            pass  # torch.export modules refuse .eval(): their graph was captured in eval mode already
        self._engine = engine
        self._module = engine.module
        self._notes.append("ZeRO-Inference: stage 3, parameters offloaded to CPU")

    # --- serving ----------------------------------------------------------------------------

    def _to_tensor(self, name: str, array: np.ndarray) -> Any:
        torch = self._torch
        spec = self.manifest.input(name)
        array = np.asarray(array)
        # A cast to the compute dtype or a move to the device copies anyway: no copy before it.
        casts = array.dtype.kind == "f" and _NUMPY_FLOATS.get(array.dtype.name) != self.dtype
        copies_later = self._kind != "cpu" or casts
        if self._input_copy and not copies_later:
            tensor = torch.from_numpy(np.array(array, copy=True))
        elif not array.flags.writeable:
            # Shared, never written: the program has no input mutations (checked at load).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_READONLY_WARNING)
                tensor = torch.from_numpy(array)
        else:
            tensor = torch.from_numpy(array)
        if spec is not None and spec.datatype == "BF16" and tensor.dtype in (torch.uint16, torch.int16):
            tensor = tensor.view(torch.bfloat16)  # V2 BF16 travels as raw 2-byte words
        if tensor.is_floating_point() and tensor.dtype != self.dtype:  # the model's precision
            tensor = tensor.to(self.dtype)
        if self._kind != "cpu":
            tensor = tensor.to(self.device, non_blocking=True)
        return tensor

    def _call(self, tensors: dict[str, Any]) -> Any:
        order = [s.name for s in self.manifest.inputs] or list(tensors)
        missing = [n for n in order if n not in tensors]
        if missing:
            raise BackendError(f"missing input(s) {missing}; the model takes {order}")
        extra = [n for n in tensors if n not in order]
        if extra:
            raise BackendError(f"unknown input(s) {extra}; the model takes {order}")
        if self.manifest.format == "hf":
            return self._module(**{n: tensors[n] for n in order})
        return self._module(*[tensors[n] for n in order])

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        torch = self._torch
        specs = self._out_specs
        if isinstance(result, torch.Tensor):
            values = [result]
        elif isinstance(result, dict):  # dict and transformers' ModelOutput
            if specs and all(s.name in result for s in specs):
                values = [result[s.name] for s in specs]
            else:
                values = [v for v in result.values() if isinstance(v, torch.Tensor)]
                if specs and len(values) < len(specs):
                    raise BackendError(f"model returned keys {list(result)}; manifest outputs are "
                                       f"{[s.name for s in specs]}")
        elif isinstance(result, (tuple, list)):
            values = list(result)
        else:
            raise BackendError(f"model returned a {type(result).__name__}; expected tensors")
        if specs and len(values) < len(specs):
            raise BackendError(f"model returned {len(values)} output(s); manifest lists {len(specs)}")
        names = [s.name for s in specs] if specs else [f"output_{i}" for i in range(len(values))]
        out: dict[str, np.ndarray] = {}
        for i, name in enumerate(names):
            value = values[i]
            if not isinstance(value, torch.Tensor):
                raise BackendError(f"output {name!r}: model returned a {type(value).__name__}, not a tensor")
            value = value.detach()
            want = _spec_torch_dtype(specs[i]) if specs else None
            if want is not None and value.dtype != want:
                value = value.to(want)  # e.g. bf16 compute widened back for an FP32 output spec
            if value.device.type != "cpu":
                value = value.cpu()
            if value.dtype == torch.bfloat16:
                array = value.view(torch.uint16).numpy()  # V2 BF16: raw 2-byte words
            else:
                array = value.numpy()
            out[name] = np.ascontiguousarray(array)
        return out

    @contextmanager
    def _grad_mode(self) -> Iterator[None]:
        # ZeRO-3 gathers weights into regular tensors during forward; inference tensors there
        # break its bookkeeping, so ZeRO runs under no_grad instead of inference_mode.
        ctx = self._torch.no_grad() if self.zero else self._torch.inference_mode()
        with ctx:
            yield

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise BackendError(f"model {self.manifest.name!r} is closed")
        with self._lock, self._grad_mode():
            tensors = {name: self._to_tensor(name, value) for name, value in inputs.items()}
            try:
                result = self._call(tensors)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"model {self.manifest.name!r} failed on this batch: {type(exc).__name__}: {exc}") from exc
            return self._outputs(result)

    # --- memory -----------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Device memory held by torch on an accelerator. On the CPU, DeepSpeed's numbers are
        the process RSS, which the runner samples already: nothing is added here."""
        if self._kind == "cpu":
            return {}
        return {
            "device_allocated": int(self._acc.memory_allocated(self._index)),
            "device_reserved": int(self._acc.memory_reserved(self._index)),
        }

    def shrink(self) -> None:
        gc.collect()
        self._acc.empty_cache()  # a no-op on DeepSpeed's CPU accelerator (no caching allocator)

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "deepspeed_accelerator": self._acc.device_name(),
            "engine": "zero3_offload" if self.zero else "init_inference",
            "format": self.manifest.format,
            "dtype": self.settings.dtype,
            "graph_fusion": self.settings.graph_fusion,
            "fusion_applied": self.plan.applied,
            "fusion_notes": list(self.plan.notes),
            "tp_size": self.settings.tp_size,
            "input_copy": self._input_copy,
            "threads": self._torch.get_num_threads(),
            "notes": list(self._notes),
        }

    def close(self) -> None:
        engine, self._engine, self._module = self._engine, None, None
        if engine is not None and self.zero:
            try:
                engine.destroy()
            except Exception:  # closing must not fail the unload; the process exits next anyway
                pass
        gc.collect()
        self._acc.empty_cache()
