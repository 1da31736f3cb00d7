"""Request inputs for a model the client knows only by its input spec: what ``lastmile tune``,
``lastmile bench``, the demo and the TUI's playground send.

Two sources, as Triton's perf_analyzer has:

- **generated** (:func:`random_inputs`) from the spec ``[{"name", "datatype", "shape", "range"?}]``
  (the store listing's ``inputs``): dim 0 is the batch (``rows``), other variable dims ``seq``;
  floats standard normal; an integer input with a ``range`` (a manifest's ``range = [low, high]``,
  or a text model's token ids below its vocabulary size) draws from it; one without draws from
  {0, 1}, valid for any embedding table, category or mask (random ids up to 63 broke every model
  with a smaller vocabulary); an attention mask is all ones.
- **the operator's data** (:func:`load_input_data`): ``--input-data FILE.npz`` (one array per
  input name) or ``FILE.json`` (``{"name": [[...]]}``, or a V2 request body's ``inputs`` list),
  checked against the spec: every input present, no unknown name, dtypes converted only when no
  value changes (:mod:`tensors`), fixed dims equal, one batch size. Each refusal is one line
  naming the input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lastmile.appliance.client.tensors import InputTypeError, conform
from lastmile.models.spec import V2_TO_NUMPY

Spec = list[dict[str, Any]]
#: Integer inputs without a known range draw from [0, SAFE_HIGH): valid ids for any table.
SAFE_HIGH = 2


class InputDataError(ValueError):
    """Inputs cannot be made or read for this model; the message is one line naming the input."""


def random_inputs(spec: Spec, rows: int = 1, seq: int = 16, seed: int | None = 0) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays that fit ``spec`` (see the module docstring), and their V2 datatypes."""
    if not spec:
        raise InputDataError("the model publishes no input spec; give its inputs with --input-data FILE.npz|.json")
    rng = np.random.default_rng(seed)
    arrays, types = {}, {}
    for tensor in spec:
        name, datatype = tensor["name"], tensor["datatype"]
        dtype = V2_TO_NUMPY.get(datatype) if datatype not in ("BF16", "BYTES") else None
        if dtype is None:
            raise InputDataError(f"input {name!r}: random {datatype} data is not generated; give it with --input-data FILE.npz|.json")
        shape = [rows if i == 0 and d == -1 else (seq if d == -1 else d) for i, d in enumerate(tensor["shape"])]
        low, high = tensor.get("range") or (0, SAFE_HIGH)
        if dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(np.bool_)
        elif "mask" in name.lower():
            array = np.ones(shape, dtype)
        else:
            array = rng.integers(low, high, shape).astype(dtype)
        arrays[name], types[name] = array, datatype
    return arrays, types


def load_input_data(path: str | Path, spec: Spec) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The operator's arrays from ``path`` (.npz or .json), checked against ``spec``."""
    path = Path(path)
    raw = _read(path)
    wanted = {t["name"]: t for t in spec}
    unknown = sorted(set(raw) - set(wanted))
    if unknown:
        raise InputDataError(f"{path}: input {unknown[0]!r} is not an input of the model; its inputs are {sorted(wanted)}")
    missing = [n for n in wanted if n not in raw]
    if missing:
        raise InputDataError(f"{path}: input {missing[0]!r} is missing; the model's inputs are {sorted(wanted)}")
    arrays, types, batch = {}, {}, None
    for name, tensor in wanted.items():
        try:
            array, _ = conform(name, raw[name], tensor["datatype"])
        except InputTypeError as exc:
            raise InputDataError(f"{path}: {exc}") from None
        dims = tensor["shape"]
        if array.ndim != len(dims) or any(d != -1 and d != a for d, a in zip(dims, array.shape)):
            raise InputDataError(f"{path}: input {name!r} has shape {list(array.shape)}; the model takes {dims} (-1: any size)")
        if batch is not None and array.shape[0] != batch:
            raise InputDataError(f"{path}: input {name!r} has {array.shape[0]} rows, the others {batch}; one batch size for all")
        batch = array.shape[0]
        arrays[name], types[name] = array, tensor["datatype"]
    return arrays, types


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        if path.suffix == ".json":
            return _json_arrays(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:  # unreadable, not an npz, not JSON, object arrays
        raise InputDataError(f"{path}: cannot read it: {exc}") from None
    raise InputDataError(f"{path}: give a .npz (one array per input) or a .json ({{\"name\": [[...]]}} or V2 \"inputs\")")


def _json_arrays(body: Any) -> dict[str, np.ndarray]:
    """``{"name": nested lists}``, or a V2 request (``{"inputs": [{"name", "shape", "data"}]}``)."""
    if isinstance(body, dict) and isinstance(body.get("inputs"), list):
        out = {}
        for i, t in enumerate(body["inputs"]):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or "data" not in t:
                raise ValueError(f"inputs[{i}] needs 'name' and 'data'")
            array = np.asarray(t["data"])
            out[t["name"]] = array.reshape(t["shape"]) if "shape" in t else array
        return out
    if isinstance(body, dict) and body:
        return {str(name): np.asarray(value) for name, value in body.items()}
    raise ValueError('expected {"name": [[...]], ...} or a V2 request body with "inputs"')
