"""Tensor specs and the manifest record: the shape of a model as every room sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lastmile.models.vocabulary import RAW_V2_DATATYPES, V2_DATATYPES

# KServe V2 datatypes as NumPy dtypes (the table is the vocabulary's; BF16 travels as uint16).
V2_TO_NUMPY: dict[str, np.dtype] = {name: np.dtype(numpy_name) for name, numpy_name in V2_DATATYPES.items()}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items() if k not in RAW_V2_DATATYPES}

FORMATS = ("onnx", "torch_export", "torchscript", "hf", "torch_pickle")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. ``-1`` in ``shape`` marks a variable dimension; dim 0 is the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    range: tuple[int, int] | None = None  # an integer input's valid values, [low, high): token ids below the vocabulary

    def as_v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def describe(self) -> dict[str, Any]:
        """Lastmile's listing of the tensor: the V2 fields, and ``range`` when it is known
        (what a client generating inputs needs; V2 metadata has no field for it)."""
        return {**self.as_v2(), **({"range": list(self.range)} if self.range else {})}

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
