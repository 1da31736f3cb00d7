"""The bundled demo models, built locally from fixed seeds (no downloads).

Two networks, each in the forms the backends load:

- ``mlp``: a classifier, ``input`` FP32 [-1, 64] -> ``logits`` FP32 [-1, 10]
  (two hidden layers of 256 with GELU);
- ``lm``: a small causal transformer over bytes, ``input_ids`` INT64 [-1, -1] ->
  ``logits`` FP32 [-1, -1, 256] (d_model 64, 2 layers, 4 heads, at most 64 positions, learned
  positional embedding, untied LM head). Attention is written out by hand (no
  ``scaled_dot_product_attention``, no buffer slicing) so that torch.export and the ONNX
  exporter both keep the batch *and* the sequence dimension dynamic.

| name          | kind | format       | backend     |
|---------------|------|--------------|-------------|
| demo-mlp      | mlp  | onnx         | onnxruntime |
| demo-mlp-ds   | mlp  | torch_export | deepspeed   |
| demo-mlp-ts   | mlp  | torchscript  | deepspeed   |
| demo-lm       | lm   | onnx         | onnxruntime |
| demo-lm-ds    | lm   | torch_export | deepspeed   |
| demo-encoder  | encoder | hf (folder) | deepspeed |

``demo-encoder`` is a Hugging Face folder as ``save_pretrained`` writes it (tiny BERT, a
WordPiece tokenizer learned from shipped text, sentence-transformers pooling + Normalize; see
:mod:`lastmile.models.demo_text`), with no ``[[inputs]]``: it takes text and answers with
normalized sentence embeddings, its tensors derived from its files (:mod:`lastmile.models.hf`).

Weights come from ``torch.manual_seed`` inside a forked RNG (the caller's RNG state is left
alone), so :func:`reference_module` rebuilds the very same module for tests that compare a
backend's output with a plain in-process computation. Each model is written into a dot-folder
of the store and renamed into place, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lastmile.models.manifest import load_manifest, write_manifest
from lastmile.models.spec import Manifest, TensorSpec
from lastmile.models.store import ModelStore

if TYPE_CHECKING:  # torch is imported lazily: importing lastmile.models.demo must stay cheap
    import torch

__all__ = ["DEMO_MODELS", "DemoModel", "build_demo", "reference_module", "example_inputs", "KINDS"]

SEEDS = {"mlp": 1234, "lm": 4321}
MLP_IN, MLP_HIDDEN, MLP_OUT = 64, 256, 10
LM_VOCAB, LM_DIM, LM_LAYERS, LM_HEADS, LM_MAX_SEQ = 256, 64, 2, 4, 64
MAX_BATCH = 4096  # the upper bound of settings.max_batch_size: the export allows any batch the batcher may form
ONNX_OPSET = 17  # LayerNormalization is a single op from 17 on

SIGNATURES: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "mlp": ((TensorSpec("input", "FP32", (-1, MLP_IN)),), (TensorSpec("logits", "FP32", (-1, MLP_OUT)),)),
    "lm": ((TensorSpec("input_ids", "INT64", (-1, -1), (0, LM_VOCAB)),), (TensorSpec("logits", "FP32", (-1, -1, LM_VOCAB)),)),
}
KINDS = tuple(SIGNATURES)


@dataclass(frozen=True)
class DemoModel:
    """How one demo model is built and described."""

    name: str
    kind: str  # "mlp" | "lm"
    format: str
    backend: str
    artifact: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)


_MLP_SETTINGS = {"max_batch_size": 32, "max_delay_ms": 2.0}
_LM_SETTINGS = {"max_batch_size": 8, "max_delay_ms": 2.0}
_ENCODER_SETTINGS = {"max_batch_size": 32, "max_delay_ms": 2.0}
_ENCODER_TEXT = (
    "Demo sentence encoder: a tiny BERT (hidden 32, 2 layers) Hugging Face folder with a real WordPiece "
    "tokenizer, mean pooling and Normalize (sentence-transformers files); random weights from a fixed seed"
)
_MLP_TEXT = "Demo classifier MLP (64 -> 256 -> 256 -> 10, GELU), random weights from a fixed seed"
_LM_TEXT = (
    "Demo causal byte-level transformer LM (d_model 64, 2 layers, 4 heads, up to 64 tokens), "
    "random weights from a fixed seed"
)

DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel("demo-mlp", "mlp", "onnx", "onnxruntime", "model.onnx", _MLP_TEXT + "; ONNX", _MLP_SETTINGS),
        DemoModel("demo-mlp-ds", "mlp", "torch_export", "deepspeed", "model.pt2", _MLP_TEXT + "; torch.export", _MLP_SETTINGS),
        DemoModel("demo-mlp-ts", "mlp", "torchscript", "deepspeed", "model.pt", _MLP_TEXT + "; TorchScript", _MLP_SETTINGS),
        DemoModel("demo-lm", "lm", "onnx", "onnxruntime", "model.onnx", _LM_TEXT + "; ONNX", _LM_SETTINGS),
        DemoModel("demo-lm-ds", "lm", "torch_export", "deepspeed", "model.pt2", _LM_TEXT + "; torch.export", _LM_SETTINGS),
        DemoModel("demo-encoder", "encoder", "hf", "deepspeed", ".", _ENCODER_TEXT, _ENCODER_SETTINGS),
    )
}


# --- the networks -------------------------------------------------------------------------------

def _classes() -> dict[str, type]:
    """The module classes, defined on first use so ``torch`` is imported only then."""
    global _CLASSES
    if _CLASSES:
        return _CLASSES
    import torch
    from torch import nn

    class DemoMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(MLP_IN, MLP_HIDDEN), nn.GELU(),
                nn.Linear(MLP_HIDDEN, MLP_HIDDEN), nn.GELU(),
                nn.Linear(MLP_HIDDEN, MLP_OUT),
            )

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the V2 tensor name
            return self.net(input)

    class CausalSelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(LM_DIM, 3 * LM_DIM)
            self.proj = nn.Linear(LM_DIM, LM_DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            hd = d // LM_HEADS
            q, k, v = self.qkv(x).split(d, dim=-1)
            q = q.reshape(b, t, LM_HEADS, hd).transpose(1, 2)
            k = k.reshape(b, t, LM_HEADS, hd).transpose(1, 2)
            v = v.reshape(b, t, LM_HEADS, hd).transpose(1, 2)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            # The mask is computed from t (not sliced from a fixed buffer): slicing a 64x64
            # buffer makes torch.export guard seq != 64, and this exports cleanly to ONNX too.
            pos = torch.arange(t, device=x.device)
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
            return self.proj(y)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(LM_DIM)
            self.attn = CausalSelfAttention()
            self.ln2 = nn.LayerNorm(LM_DIM)
            self.mlp = nn.Sequential(nn.Linear(LM_DIM, 4 * LM_DIM), nn.GELU(), nn.Linear(4 * LM_DIM, LM_DIM))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class DemoLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(LM_VOCAB, LM_DIM)
            self.pos = nn.Embedding(LM_MAX_SEQ, LM_DIM)
            self.blocks = nn.ModuleList(Block() for _ in range(LM_LAYERS))
            self.ln_f = nn.LayerNorm(LM_DIM)
            self.head = nn.Linear(LM_DIM, LM_VOCAB, bias=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            t = input_ids.shape[1]
            # Embedding lookup of arange(t): more than 64 positions fails with an index error.
            x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    _CLASSES = {"mlp": DemoMLP, "lm": DemoLM}
    return _CLASSES


_CLASSES: dict[str, type] = {}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown demo kind {kind!r}; known: {', '.join(KINDS)}")


def reference_module(kind: str) -> "torch.nn.Module":
    """The demo network ``kind`` ("mlp" or "lm") with the demo weights, in eval mode: the
    same numbers every call and every build."""
    _check_kind(kind)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[kind])
        module = _classes()[kind]()
    return module.eval()


def example_inputs(kind: str, batch: int, *, seq: int = 16) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``kind`` with ``batch`` rows (and ``seq`` tokens for "lm")."""
    _check_kind(kind)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rng = np.random.default_rng([SEEDS[kind], batch, seq])
    if kind == "mlp":
        return {"input": rng.standard_normal((batch, MLP_IN), dtype=np.float32)}
    if not 1 <= seq <= LM_MAX_SEQ:
        raise ValueError(f"seq must be 1..{LM_MAX_SEQ}, got {seq}")
    return {"input_ids": rng.integers(0, LM_VOCAB, size=(batch, seq), dtype=np.int64)}


# --- export ---------------------------------------------------------------------------------

def _example_tensor(kind: str) -> "torch.Tensor":
    import torch

    # Batch 2 / seq 8 for tracing: sizes 0 and 1 would be specialised by torch.export.
    return torch.from_numpy(example_inputs(kind, 2, seq=8)[SIGNATURES[kind][0][0].name])


def _export_onnx(kind: str, module: "torch.nn.Module", path: Path) -> None:
    import torch

    example = _example_tensor(kind)
    (inp,), (out,) = SIGNATURES[kind]
    axes = {0: "batch"} if kind == "mlp" else {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter: 0.5 s against 7 s for dynamo, and byte-identical
            # output from build to build.
            torch.onnx.export(
                module, (example,), str(path), input_names=[inp.name], output_names=[out.name],
                dynamic_axes={inp.name: axes, out.name: axes}, opset_version=ONNX_OPSET, dynamo=False,
            )
        except Exception:  # a torch that dropped the TorchScript exporter: use dynamo
            onnx_program = torch.onnx.export(
                module, (example,), input_names=[inp.name], output_names=[out.name],
                dynamic_shapes={inp.name: _torch_dims(kind)}, opset_version=18, dynamo=True,
                external_data=False,
            )
            onnx_program.save(str(path), external_data=False)


def _torch_dims(kind: str) -> dict[int, Any]:
    from torch.export import Dim

    dims = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if kind == "lm":
        dims[1] = Dim("seq", min=1, max=LM_MAX_SEQ)
    return dims


def _export_program(kind: str, module: "torch.nn.Module", path: Path) -> None:
    import torch

    name = SIGNATURES[kind][0][0].name
    program = torch.export.export(module, (_example_tensor(kind),), dynamic_shapes={name: _torch_dims(kind)})
    torch.export.save(program, str(path))


def _export_torchscript(kind: str, module: "torch.nn.Module", path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream, still the format
        scripted = torch.jit.trace(module, (_example_tensor(kind),))
        torch.jit.save(scripted, str(path))


_EXPORTERS = {"onnx": _export_onnx, "torch_export": _export_program, "torchscript": _export_torchscript}


# --- building into a store ------------------------------------------------------------------

def demo_manifest(demo: DemoModel, folder: Path) -> Manifest:
    # the encoder's tensors are derived from its folder (lastmile.models.hf), not written down
    inputs, outputs = SIGNATURES.get(demo.kind, ((), ()))
    return Manifest(
        name=demo.name, path=folder, format=demo.format, artifact=folder / demo.artifact,
        backend=demo.backend, inputs=inputs, outputs=outputs, settings=dict(demo.settings),
        description=demo.description,
    )


def build_one(store: Path, demo: DemoModel, *, force: bool = False) -> bool:
    """Build ``demo`` into ``store/demo.name``; ``False`` when it was there already."""
    import torch

    final = ModelStore(store).path_for(demo.name)
    if final.exists() and not force:
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{demo.name}-", dir=store))
    try:
        if demo.kind == "encoder":
            from lastmile.models.demo_text import build_encoder_folder

            build_encoder_folder(tmp)
        else:
            with torch.no_grad():
                _EXPORTERS[demo.format](demo.kind, reference_module(demo.kind), tmp / demo.artifact)
        (tmp / "model.toml").write_text(write_manifest(demo_manifest(demo, tmp)), encoding="utf-8")
        load_manifest(tmp, demo.name)  # never rename a folder into place that would not load
        os.chmod(tmp, 0o750)  # mkdtemp makes 0700
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{demo.name}-", dir=store))
            os.rename(final, old / demo.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def build_demo(store: Path, *, force: bool = False, names: list[str] | None = None) -> list[str]:
    """Build the demo models (all, or ``names``) into the store folder ``store``; models
    already present are skipped unless ``force``. Returns the names built."""
    store = ModelStore(store).ensure()
    wanted = list(DEMO_MODELS) if names is None else names
    for name in wanted:
        if name not in DEMO_MODELS:
            raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    return [name for name in wanted if build_one(store, DEMO_MODELS[name], force=force)]


if __name__ == "__main__":  # python -m lastmile.models.demo STORE [--force]
    import argparse

    parser = argparse.ArgumentParser(description="Build the Lastmile demo models into a model store.")
    parser.add_argument("store", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild models that are already there")
    args = parser.parse_args()
    built = build_demo(args.store, force=args.force)
    print("built: " + (", ".join(built) if built else "nothing (all present; --force rebuilds)"))
