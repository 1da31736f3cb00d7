"""Tensor specs and the manifest record: the shape of a model as every room sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# KServe Open Inference Protocol V2 datatypes and their NumPy equivalents. BF16 has no NumPy
# dtype: it travels as raw 2-byte words (uint16) and is widened by the backend.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items() if k != "BF16"}

FORMATS = ("onnx", "torch_export", "torchscript", "hf", "torch_pickle")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. ``-1`` in ``shape`` marks a variable dimension; dim 0 is the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @property
    def numpy_dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]


@dataclass(frozen=True)
class Manifest:
    """A model folder's description, from ``model.toml`` or inferred from the artifact.

    ``settings`` holds only what the manifest sets (validated); ``missing`` lists what could not
    be inferred for a folder without a manifest, in words an operator can act on.
    """

    name: str
    path: Path  # the model folder inside the store
    format: str
    artifact: Path  # absolute, inside ``path``
    backend: str = "auto"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    description: str = ""
    from_manifest_file: bool = True
    missing: tuple[str, ...] = ()
    # A Hugging Face folder's description (lastmile.models.hf.HfFolder): task, tokenizer,
    # pooling, labels, and which file each came from. None for other formats.
    hf: Any = None

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)
