"""Telling a model's format from its files, and reading the signature the format carries.

torch and onnx are imported inside the functions that need them: the daemon imports this
module to list the store, and must not pay torch's import time (or memory) for that.

What each format carries:

- ONNX: graph inputs/outputs with element types and shapes (symbolic dims -> ``-1``).
- torch.export ``.pt2``: the graph signature with fake-tensor metadata (symbolic dims -> ``-1``);
  output *names* are only known when ``forward`` returns a dict.
- TorchScript, Hugging Face folders, pickled modules: no usable tensor signature; the operator
  has to write ``[[inputs]]``/``[[outputs]]``. A pickle is never opened here (that would run
  its code).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterable

from lastmile.models.errors import FormatError
from lastmile.models.spec import FORMATS, TensorSpec

MANIFEST_FILE = "model.toml"

# Suffixes that name a format outright. ``.pt``/``.pth``/``.ts``/``.jit`` are torch zip archives
# that may be TorchScript or a pickle: :func:`torch_archive_kind` looks inside.
_SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch_export"}
_TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".ptl")

ONNX_TO_V2 = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FLOAT16": "FP16",
    "FLOAT": "FP32",
    "DOUBLE": "FP64",
    "BFLOAT16": "BF16",
}

NO_SIGNATURE = "inputs/outputs unknown: add [[inputs]] and [[outputs]] to model.toml"


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: ``config.json`` plus at least one ``*.safetensors``. (A
    folder with only a pickled ``pytorch_model.bin`` is served only when model.toml names it
    with ``format = "hf"``, ``artifact = "."`` and ``trust_pickle = true``.)"""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def torch_archive_kind(path: Path) -> str:
    """``torchscript`` or ``torch_pickle`` for a ``.pt``-like file, read from the zip listing
    only (nothing is unpickled). ``torch.jit.save`` archives hold ``code/`` and
    ``constants.pkl``; ``torch.save`` archives (and legacy non-zip files) hold just a pickle."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "torch_pickle"
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "torch_pickle"


def format_of(path: Path) -> str | None:
    """The format ``path`` looks like by itself, or ``None`` when it names none."""
    if path.is_dir():
        return "hf" if is_hf_folder(path) else None
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if suffix in _TORCH_SUFFIXES:
        return torch_archive_kind(path)
    return None


def _visible(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if not p.name.startswith(".") and p.name != MANIFEST_FILE)


def find_candidates(model_dir: Path) -> list[tuple[str, Path]]:
    """Every artifact in ``model_dir`` (top level, plus the folder itself when it is a Hugging
    Face folder), as ``(format, path)``. ONNX external-data files are not candidates."""
    found: list[tuple[str, Path]] = []
    if is_hf_folder(model_dir):
        found.append(("hf", model_dir))
    real_dir = model_dir.resolve()
    for path in _visible(model_dir):
        # A link out of the folder is named by its suffix only, never opened: the caller
        # refuses it (check_inside) with a message that says where it leads.
        inside = not path.is_symlink() or path.resolve().is_relative_to(real_dir)
        fmt = format_of(path) if inside else _suffix_format(path)
        if fmt is not None:
            found.append((fmt, path))
    return found


def _suffix_format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return _SUFFIX_FORMATS.get(suffix) or ("torch_pickle" if suffix in _TORCH_SUFFIXES else None)


def detect_format(model_dir: Path, *, want: str | None = None) -> tuple[str, Path]:
    """The one artifact in ``model_dir`` (of format ``want`` when given).

    Raises :class:`FormatError` listing what was found when there is none or more than one, so
    the operator knows which file to name in ``model.toml``.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FormatError(f"{model_dir} is not a folder")
    candidates = find_candidates(model_dir)
    if want is not None:
        candidates = [c for c in candidates if c[0] == want]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        listing = ", ".join(p.name + ("/" if p.is_dir() else "") for p in _visible(model_dir)) or "nothing"
        kind = f"no {want} artifact" if want else "no model artifact"
        hint = ""
        if (model_dir / "config.json").is_file() and not any(model_dir.glob("*.safetensors")):
            hint = (
                "; config.json is there but no *.safetensors: a Hugging Face folder must hold "
                "safetensors weights (pytorch_model.bin is a pickle)"
            )
        raise FormatError(
            f"{kind} found in {model_dir} (found: {listing}){hint}; expected a *.onnx file, a "
            "torch.export *.pt2, a TorchScript *.pt/*.ts, or a Hugging Face folder with "
            "config.json and *.safetensors; or name it with format and artifact in model.toml"
        )
    listing = ", ".join(f"{_rel(p, model_dir)} ({fmt})" for fmt, p in candidates)
    raise FormatError(
        f"more than one model artifact in {model_dir}: {listing}; set format and artifact in "
        "model.toml to say which one to serve"
    )


def _rel(path: Path, base: Path) -> str:
    return "." if path == base else str(path.relative_to(base))


def artifact_problem(fmt: str, artifact: Path) -> str | None:
    """Why ``artifact`` cannot be a ``fmt`` artifact (wrong kind of path, missing files), or
    ``None`` when it looks right. Cheap checks only: the backend finds the rest at load."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}"
    if not artifact.exists():
        return "does not exist"
    if fmt == "hf":
        if not artifact.is_dir():
            return "format hf needs a folder (with config.json and *.safetensors), not a file"
        if not (artifact / "config.json").is_file():
            return "Hugging Face folder has no config.json"
        from lastmile.models.hf import has_hf_weights

        if not has_hf_weights(artifact):
            return "Hugging Face folder has no *.safetensors weights"
        return None
    if not artifact.is_file():
        return f"format {fmt} needs a file, not a folder"
    return None


def batch_notes(kind: str, specs: Iterable[TensorSpec]) -> list[str]:
    """Sentences for tensors whose dim 0 is not a variable batch dimension."""
    notes = []
    for spec in specs:
        if not spec.shape:
            notes.append(
                f"{kind} {spec.name!r} is a scalar with no batch dimension: requests cannot be "
                "batched; re-export the model with a leading batch dimension"
            )
        elif spec.shape[0] != -1:
            notes.append(
                f"{kind} {spec.name!r} has a fixed batch dimension of {spec.shape[0]} (dim 0): "
                "requests cannot be stacked along it; re-export with a dynamic batch dimension, "
                f"or set max_batch_size = {spec.shape[0]} in [settings] and send exactly that batch"
            )
    return notes


def infer_signature(fmt: str, artifact: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[str, ...]]:
    """``(inputs, outputs, missing)`` as far as ``fmt`` carries them.

    ``missing`` holds plain sentences for what could not be inferred. Raises
    :class:`FormatError` when the artifact cannot be read at all (corrupt file).
    """
    artifact = Path(artifact)
    if fmt == "onnx":
        inputs, outputs, notes = _onnx_signature(artifact)
    elif fmt == "torch_export":
        inputs, outputs, notes = _export_signature(artifact)
    elif fmt == "torchscript":
        return (), (), (f"{NO_SIGNATURE} (a TorchScript file stores no tensor signature)",)
    elif fmt == "hf":  # the task, tokenizer and tensors come from the folder's JSON files
        from lastmile.models.hf import manifest_parts

        _, hf_in, hf_out, hf_notes = manifest_parts(artifact)
        return hf_in, hf_out, hf_notes
    elif fmt == "torch_pickle":
        return (), (), (f"{NO_SIGNATURE} (a pickled module is not opened to look inside)",)
    else:
        raise FormatError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    notes += batch_notes("input", inputs) + batch_notes("output", outputs)
    return tuple(inputs), tuple(outputs), tuple(notes)


def _onnx_signature(artifact: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    import onnx  # lazy: see module docstring

    try:
        model = onnx.load(str(artifact), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError; any failure means unreadable
        raise FormatError(f"could not read ONNX file {artifact}: {exc}") from exc
    graph = model.graph
    # Before IR 4, initializers were also listed as graph inputs; they are weights, not inputs.
    initializers = {init.name for init in graph.initializer}
    notes: list[str] = []

    def convert(kind: str, values: Iterable[Any]) -> list[TensorSpec]:
        specs = []
        for value in values:
            if value.name in initializers:
                continue
            if not value.type.HasField("tensor_type"):
                notes.append(
                    f"{kind} {value.name!r} is not a tensor (ONNX {value.type.WhichOneof('value')}): "
                    "KServe V2 carries only tensors"
                )
                continue
            tensor = value.type.tensor_type
            type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            datatype = ONNX_TO_V2.get(type_name)
            if datatype is None:
                notes.append(
                    f"{kind} {value.name!r} has ONNX type {type_name}, which has no KServe V2 "
                    f"datatype here; allowed: {', '.join(ONNX_TO_V2)}"
                )
                continue
            if not tensor.HasField("shape"):
                notes.append(
                    f"{kind} {value.name!r} has no shape in the ONNX graph: add its shape in "
                    f"[[{kind}s]] in model.toml"
                )
                shape: tuple[int, ...] = (-1,)
            else:
                shape = tuple(
                    d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                    for d in tensor.shape.dim
                )
            specs.append(TensorSpec(value.name, datatype, shape))
        return specs

    return convert("input", graph.input), convert("output", graph.output), notes


def _torch_to_v2() -> dict[Any, str]:
    import torch

    return {
        torch.bool: "BOOL",
        torch.uint8: "UINT8",
        torch.uint16: "UINT16",
        torch.uint32: "UINT32",
        torch.uint64: "UINT64",
        torch.int8: "INT8",
        torch.int16: "INT16",
        torch.int32: "INT32",
        torch.int64: "INT64",
        torch.float16: "FP16",
        torch.float32: "FP32",
        torch.float64: "FP64",
        torch.bfloat16: "BF16",
    }


def _export_signature(artifact: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    import torch  # lazy: see module docstring
    from torch.export.graph_signature import InputKind, OutputKind

    try:
        program = torch.export.load(str(artifact))
    except Exception as exc:
        raise FormatError(f"could not read torch.export program {artifact}: {exc}") from exc
    dtypes = _torch_to_v2()
    notes: list[str] = []
    nodes = {node.name: node for node in program.graph.nodes}

    def spec_for(kind: str, name: str, node_name: str) -> TensorSpec | None:
        node = nodes.get(node_name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor):
            notes.append(f"{kind} {name!r} is not a tensor in the program: KServe V2 carries only tensors")
            return None
        datatype = dtypes.get(value.dtype)
        if datatype is None:
            notes.append(f"{kind} {name!r} has torch dtype {value.dtype}, which has no KServe V2 datatype here")
            return None
        # Concrete ints stay; SymInts (dims marked dynamic with torch.export.Dim) become -1.
        shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
        return TensorSpec(name, datatype, shape)

    signature = program.graph_signature
    inputs = [
        spec_for("input", s.arg.name, s.arg.name)
        for s in signature.input_specs
        if s.kind == InputKind.USER_INPUT
    ]
    output_nodes = [s.arg.name for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    out_spec = program.call_spec.out_spec
    out_names: list[str]
    if out_spec is not None and out_spec.type is dict and len(out_spec.context) == len(output_nodes):
        out_names = [str(key) for key in out_spec.context]
    else:
        out_names = ["output"] if len(output_nodes) == 1 else [f"output_{i}" for i in range(len(output_nodes))]
        notes.append(
            "output names are not stored in a torch.export program (forward returns tensors, not "
            f"a dict): named them {', '.join(out_names)}; add [[outputs]] to model.toml to name them"
        )
    outputs = [spec_for("output", name, node) for name, node in zip(out_names, output_nodes)]
    return [s for s in inputs if s], [s for s in outputs if s], notes
