"""What the ``graph_fusion`` setting (off / basic / extended / all) means for each backend.

One vocabulary for the operator, two very different mechanisms underneath, so the mapping
lives in one place and each backend reports in ``info()`` what was really applied:

- ONNX Runtime: the session's ``graph_optimization_level`` (constant folding and redundant
  node removal at *basic*; op fusions such as MatMul+Add->Gemm, GELU, LayerNorm at
  *extended*; layout optimizations that are specific to this CPU/GPU at *all*).
- DeepSpeed / torch: ``replace_with_kernel_inject`` (DeepSpeed's fused transformer kernels)
  at *extended*/*all* on CUDA, for the module classes DeepSpeed has injection policies for
  (Hugging Face models); TorchScript freezing (weights folded into the graph as constants)
  at *extended*, plus ``torch.jit.optimize_for_inference`` at *all*. ``torch.compile`` is
  deliberately not used: on this appliance's CPUs it measured no gain on matmul-bound models
  and costs ~15 s on the first call, which would land on the first request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lastmile.models.settings import GRAPH_FUSION_LEVELS

__all__ = ["ORT_LEVEL_NAMES", "ort_optimization_level", "TorchFusionPlan", "torch_fusion_plan"]

# graph_fusion -> onnxruntime.GraphOptimizationLevel member name
ORT_LEVEL_NAMES: dict[str, str] = {
    "off": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
assert set(ORT_LEVEL_NAMES) == set(GRAPH_FUSION_LEVELS)

# Formats whose modules are Python nn.Module classes DeepSpeed's injection policies can match
# (HF BERT/GPT/LLaMA... layers). A torch.export graph or a TorchScript module has no such
# classes left: kernel injection would walk it and replace nothing.
KERNEL_INJECT_FORMATS = ("hf", "torch_pickle")


def _check(level: str) -> None:
    if level not in ORT_LEVEL_NAMES:
        raise ValueError(f"graph_fusion: got {level!r}; allowed: {', '.join(GRAPH_FUSION_LEVELS)}")


def ort_optimization_level(level: str):  # -> onnxruntime.GraphOptimizationLevel
    """The ONNX Runtime ``GraphOptimizationLevel`` for a ``graph_fusion`` value."""
    _check(level)
    import onnxruntime

    return getattr(onnxruntime.GraphOptimizationLevel, ORT_LEVEL_NAMES[level])


@dataclass(frozen=True)
class TorchFusionPlan:
    """What the DeepSpeed backend will do for one model; ``notes`` go to ``info()`` verbatim,
    including what was *not* applied and why."""

    kernel_inject: bool = False
    freeze_torchscript: bool = False
    optimize_for_inference: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def applied(self) -> list[str]:
        out = []
        if self.kernel_inject:
            out.append("deepspeed_kernel_inject")
        if self.freeze_torchscript:
            out.append("torchscript_freeze")
        if self.optimize_for_inference:
            out.append("torchscript_optimize_for_inference")
        return out


def torch_fusion_plan(level: str, device_kind: str, fmt: str, *, zero_offload: bool = False) -> TorchFusionPlan:
    """The plan for ``graph_fusion = level`` on ``device_kind`` (cpu/cuda/npu...) for format
    ``fmt``. Pure: no torch import, so it can be shown before a load too."""
    _check(level)
    if level in ("off", "basic"):
        return TorchFusionPlan(notes=(f"graph_fusion {level}: the module runs as loaded",))
    if zero_offload:
        return TorchFusionPlan(
            notes=("ZeRO-Inference offload: no fusion (ZeRO-3 gathers each layer's weights in "
                   "its forward hooks; fused or frozen graphs would bypass them)",)
        )
    notes: list[str] = []
    kernel_inject = False
    if device_kind == "cuda":
        if fmt in KERNEL_INJECT_FORMATS:
            kernel_inject = True
            notes.append("DeepSpeed kernel injection requested (replace_with_kernel_inject)")
        else:
            notes.append(
                f"DeepSpeed kernel injection not applied: it replaces Hugging Face layer classes and a "
                f"{fmt} module has none"
            )
    else:
        notes.append(f"DeepSpeed kernel injection not applied: it needs CUDA (device is {device_kind})")
    freeze = fmt == "torchscript"
    ofi = freeze and level == "all"
    if freeze:
        notes.append("TorchScript freezing applied" + (" with optimize_for_inference" if ofi else ""))
    elif fmt == "torch_export":
        notes.append("no further fusion for torch.export programs (already a traced ATen graph; "
                     "torch.compile not used: no measured gain on CPU, ~15 s first call)")
    else:
        notes.append("no further fusion for eager modules (torch.compile not used: no measured "
                     "gain on CPU, ~15 s first call)")
    return TorchFusionPlan(kernel_inject=kernel_inject, freeze_torchscript=freeze, optimize_for_inference=ofi,
                           notes=tuple(notes))
