"""``model.toml``: reading and checking a model folder's description, or inferring one.

Every problem is a :class:`ManifestError` naming the file and the dotted key, with what is
allowed, e.g. ``/models/clf/model.toml: inputs[0].datatype: got 'FLOAT'; allowed: BOOL, ...``.
Unknown keys are errors (a typo must not be silently ignored). A folder without ``model.toml``
is described from its artifact (see :mod:`lastmile.models.formats`) with ``from_manifest_file=False``
and ``missing`` saying what the operator still has to write.

Example::

    name = "demo-mlp"
    format = "onnx"
    artifact = "model.onnx"
    backend = "onnxruntime"
    description = "..."

    [settings]
    max_batch_size = 32

    [[inputs]]
    name = "input"
    datatype = "FP32"
    shape = [-1, 64]
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from lastmile.models.errors import FormatError, ManifestError, StoreEscapeError
from lastmile.models.formats import MANIFEST_FILE, artifact_problem, batch_notes, detect_format, format_of, infer_signature
from lastmile.models.settings import BACKENDS, SettingError, validate_settings
from lastmile.models.spec import FORMATS, V2_TO_NUMPY, Manifest, TensorSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ManifestError", "StoreEscapeError", "load_manifest", "write_manifest", "BACKEND_FORMATS"]

MAX_MANIFEST_BYTES = 1024 * 1024
TOP_LEVEL_KEYS = ("name", "format", "artifact", "backend", "description", "trust_pickle", "inputs", "outputs", "settings",
                  "text")
TENSOR_KEYS = ("name", "datatype", "shape")
OPTIONAL_TENSOR_KEYS = ("range",)  # inputs only: [low, high) of an integer input's valid values

# Which backend can load which format; ``auto`` picks from this table at load time.
BACKEND_FORMATS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx",),
    "deepspeed": ("torch_export", "torchscript", "hf", "torch_pickle"),
}

PICKLE_REFUSAL = (
    "format torch_pickle loads a whole pickled nn.Module, and unpickling runs whatever code the "
    "file contains (arbitrary code execution as the lastmile user); refused unless you trust "
    "where this file came from and set trust_pickle = true in {file}. Better: re-export it as a "
    "torch.export .pt2 or ONNX file, which hold no code"
)


def load_manifest(model_dir: Path, name: str, *, read_signature: Callable[[str, Path], Any] = infer_signature) -> Manifest:
    """The manifest of the model folder ``model_dir`` served as ``name``.

    Reads ``model_dir/model.toml`` when present, else infers everything from the artifact.
    Raises :class:`ManifestError` (or its subclass :class:`StoreEscapeError` when the artifact
    resolves outside the folder). ``read_signature`` reads what the artifact carries (the
    daemon's store passes a cached reader that works in a forkserver child).
    """
    model_dir = Path(model_dir).absolute()
    file = model_dir / MANIFEST_FILE
    if not file.is_symlink() and not file.exists():
        return _inferred(model_dir, name, read_signature)
    return _from_table(model_dir, file, name, _read_toml(model_dir, file), read_signature)


def _read_toml(model_dir: Path, file: Path) -> dict[str, Any]:
    """``model.toml`` as a table. A link leading out of the model folder is refused before
    the file is opened (the daemon may run as root: a link to ``/etc/shadow`` must not be
    parsed), and no error quotes the file's text: viewers see these messages."""
    check_inside(model_dir, file, file, "")
    real = file.resolve()
    try:
        # O_NOFOLLOW on the resolved path: a link swapped in after the check is not followed.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(file, "", f"cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(file, "", f"is larger than {MAX_MANIFEST_BYTES // 1024} KiB; a model.toml is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(file, "", f"is not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give a position and the rule broken, never the text itself.
        raise ManifestError(file, "", f"not valid TOML: {exc}") from None


def _from_table(model_dir: Path, file: Path, name: str, data: Mapping[str, Any],
                read_signature: Callable[[str, Path], Any] = infer_signature) -> Manifest:
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ManifestError(file, key, f"unknown key; known: {', '.join(TOP_LEVEL_KEYS)}")

    if "name" in data:
        declared = _string(file, "name", data["name"])
        if declared != name:
            raise ManifestError(
                file, "name", f"got {declared!r} but the folder is named {name!r}; they must match "
                "(the folder name is the model name; remove the key or rename the folder)"
            )
    description = _string(file, "description", data.get("description", ""))
    trust_pickle = data.get("trust_pickle", False)
    if not isinstance(trust_pickle, bool):
        raise ManifestError(file, "trust_pickle", f"got {trust_pickle!r}; allowed: true, false")

    settings_table = data.get("settings", {})
    if not isinstance(settings_table, dict):
        raise ManifestError(file, "settings", f"must be a table ([settings]), got {type(settings_table).__name__}")
    try:
        settings = validate_settings(settings_table, prefix="settings.")
    except SettingError as exc:
        raise ManifestError(file, exc.key, exc.message) from exc

    backend = data.get("backend")
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ManifestError(file, "backend", f"got {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend is not None and settings.get("backend", backend) != backend:
        raise ManifestError(
            file, "settings.backend",
            f"got {settings['backend']!r} but backend = {backend!r} at the top; set it in one place",
        )
    backend = backend or settings.get("backend", "auto")

    fmt, artifact = _format_and_artifact(model_dir, file, data)
    if fmt == "torch_pickle" and not trust_pickle:
        raise ManifestError(file, "trust_pickle", PICKLE_REFUSAL.format(file=file))
    if backend != "auto" and fmt not in BACKEND_FORMATS[backend]:
        able = [b for b, formats in BACKEND_FORMATS.items() if fmt in formats]
        raise ManifestError(
            file, "backend", f"{backend} cannot load format {fmt}; use {' or '.join(able + ['auto'])}"
        )

    inputs = _tensors(file, "inputs", data["inputs"]) if "inputs" in data else None
    outputs = _tensors(file, "outputs", data["outputs"]) if "outputs" in data else None
    missing: list[str] = []
    hf, hf_signature = _hf_parts(file, fmt, artifact, trust_pickle, data)
    if hf_signature is not None and inputs is None and outputs is None:
        inputs, outputs, missing = list(hf_signature[0]), list(hf_signature[1]), list(hf_signature[2])
    elif inputs is None or outputs is None:
        # Whatever the file leaves out is read from the artifact, as for a folder with no file.
        try:
            found_in, found_out, notes = read_signature(fmt, artifact)
        except FormatError as exc:
            raise ManifestError(file, "artifact", str(exc)) from exc
        if inputs is None and outputs is None:
            inputs, outputs, missing = list(found_in), list(found_out), list(notes)
        else:  # one side written: only notes about the other side apply
            side, found = ("inputs", found_in) if inputs is None else ("outputs", found_out)
            if found:
                missing = batch_notes(side[:-1], found)
            else:
                missing = [f"{side} unknown: add [[{side}]] to model.toml"]
            inputs = list(found) if inputs is None else inputs
            outputs = list(found) if outputs is None else outputs

    return Manifest(
        name=name,
        path=model_dir,
        format=fmt,
        artifact=artifact,
        backend=backend,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        settings=settings,
        trust_pickle=trust_pickle,
        description=description,
        from_manifest_file=True,
        missing=tuple(missing),
        hf=hf,
    )


def _hf_parts(file: Path, fmt: str, artifact: Path, trust_pickle: bool, data: Mapping[str, Any]) -> tuple[Any, Any]:
    """A Hugging Face folder's description (``[text]`` overriding what its files say) and its
    derived signature; ``(None, None)`` for other formats. See :mod:`lastmile.models.hf`."""
    table = data.get("text", {})
    if not isinstance(table, dict):
        raise ManifestError(file, "text", f"must be a table ([text]), got {type(table).__name__}")
    if fmt == "onnx":  # an ONNX export next to its source's config.json + tokenizer.json takes text too
        from lastmile.models.hf import onnx_text_parts

        parts = onnx_text_parts(file.parent, artifact, table)
        if parts is not None:
            return parts[0], parts[1:]
    if fmt != "hf":
        if "text" in data:
            raise ManifestError(file, "text", f"[text] describes Hugging Face folders (and their ONNX exports, with "
                                f"config.json and tokenizer.json); this model's format is {fmt}")
        return None, None
    from lastmile.models.hf import manifest_parts

    hf, inputs, outputs, notes = manifest_parts(artifact, trust_pickle=trust_pickle, overrides=table)
    return hf, (inputs, outputs, notes)


def _string(file: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(file, key, f"must be a string, got {value!r}")
    return value


def _format_and_artifact(model_dir: Path, file: Path, data: Mapping[str, Any]) -> tuple[str, Path]:
    fmt = data.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in FORMATS):
        raise ManifestError(file, "format", f"got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if "artifact" not in data:
        try:
            detected, artifact = detect_format(model_dir, want=fmt)
        except FormatError as exc:
            raise ManifestError(file, "artifact", f"not set, and {exc}") from exc
        check_inside(model_dir, artifact, file, "artifact")
        if detected == "hf":
            check_folder_inside(model_dir, artifact, file)
        return detected, artifact

    rel = _string(file, "artifact", data["artifact"])
    if not rel or Path(rel).is_absolute():
        raise ManifestError(file, "artifact", f"got {rel!r}; must be a path relative to the model folder {model_dir}")
    artifact = model_dir / rel
    check_inside(model_dir, artifact, file, "artifact")
    if not artifact.exists():
        raise ManifestError(file, "artifact", f"{rel!r} does not exist in {model_dir}")
    if fmt is None:
        fmt = format_of(artifact)
        if fmt is None:
            raise ManifestError(
                file, "format", f"not set and cannot be told from {rel!r}; allowed: {', '.join(FORMATS)}"
            )
    problem = artifact_problem(fmt, artifact)
    if problem:
        raise ManifestError(file, "artifact", f"{rel!r}: {problem}")
    if fmt == "hf":
        check_folder_inside(model_dir, artifact, file)
    return fmt, artifact


def check_folder_inside(base: Path, folder: Path, file: Path) -> None:
    """Every entry of a Hugging Face folder is opened by the backend: none may link out."""
    for child in sorted(folder.iterdir()):
        if child.is_symlink():
            check_inside(base, child, file, "artifact")


def check_inside(base: Path, path: Path, file: Path, key: str) -> None:
    """Refuse ``path`` when, symlinks resolved, it is not ``base`` or below it."""
    real_base = base.resolve()
    real = path.resolve()
    if real != real_base and not real.is_relative_to(real_base):
        raise StoreEscapeError(
            file, key,
            f"{path} resolves to {real}, outside {real_base}; a model's files must stay inside its "
            "folder (copy the file in instead of linking to it)",
        )


def _tensors(file: Path, key: str, value: Any) -> list[TensorSpec]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ManifestError(file, key, f"must be an array of tables ([[{key}]]), got {value!r}")
    if not value:
        raise ManifestError(file, key, f"must list at least one tensor (or leave [[{key}]] out to infer it)")
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for i, table in enumerate(value):
        where = f"{key}[{i}]"
        known = TENSOR_KEYS + (OPTIONAL_TENSOR_KEYS if key == "inputs" else ())
        for k in table:
            if k not in known:
                raise ManifestError(file, f"{where}.{k}", f"unknown key; known: {', '.join(known)}")
        for k in TENSOR_KEYS:
            if k not in table:
                raise ManifestError(file, f"{where}.{k}", "missing; each tensor needs name, datatype and shape")
        name = table["name"]
        if not isinstance(name, str) or not name:
            raise ManifestError(file, f"{where}.name", f"got {name!r}; must be a non-empty string")
        if name in seen:
            raise ManifestError(file, f"{where}.name", f"{name!r} is listed twice in {key}")
        seen.add(name)
        datatype = table["datatype"]
        if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
            raise ManifestError(file, f"{where}.datatype", f"got {datatype!r}; allowed: {', '.join(V2_TO_NUMPY)}")
        value_range = _range(file, f"{where}.range", table["range"], datatype) if "range" in table else None
        specs.append(TensorSpec(name, datatype, _shape(file, f"{where}.shape", table["shape"]), value_range))
    return specs


def _range(file: Path, key: str, value: Any, datatype: str) -> tuple[int, int]:
    """``[low, high]``: the integer input's valid values are low..high-1 (token ids: [0, vocab_size])."""
    if V2_TO_NUMPY[datatype].kind not in "iu":
        raise ManifestError(file, key, f"only an integer input has a range; this one is {datatype}")
    if (not isinstance(value, list) or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
            or value[0] >= value[1]):
        raise ManifestError(file, key, f"got {value!r}; allowed: [low, high] with integers low < high (values low..high-1)")
    return value[0], value[1]


def _shape(file: Path, key: str, shape: Any) -> tuple[int, ...]:
    rule = "a list of integers, each -1 (variable) or >= 1, starting with -1 (the batch dimension)"
    if not isinstance(shape, list) or not shape:
        raise ManifestError(file, key, f"got {shape!r}; allowed: {rule}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not (dim == -1 or dim >= 1):
            raise ManifestError(file, key, f"got {shape!r}: {dim!r} is not allowed; allowed: {rule}")
    if shape[0] != -1:
        raise ManifestError(
            file, key, f"got {shape!r}: dim 0 is the batch dimension and must be -1 (the batcher "
            "stacks requests along it); if the model only takes a batch of N, keep -1 and set "
            "max_batch_size = N in [settings]",
        )
    return tuple(shape)


def _inferred(model_dir: Path, name: str, read_signature: Callable[[str, Path], Any] = infer_signature) -> Manifest:
    """A manifest for a folder with no ``model.toml``, from its one artifact."""
    try:
        fmt, artifact = detect_format(model_dir)
    except FormatError as exc:
        raise ManifestError(model_dir, "format", f"no {MANIFEST_FILE}, and {exc}") from exc
    check_inside(model_dir, artifact, model_dir, "artifact")
    if fmt == "hf":
        check_folder_inside(model_dir, artifact, model_dir)
    if fmt == "torch_pickle":
        raise ManifestError(
            model_dir, "trust_pickle",
            f"{artifact.name} looks like a pickled torch file; " + PICKLE_REFUSAL.format(file=model_dir / MANIFEST_FILE),
        )
    hf = None
    from lastmile.models.hf import manifest_parts, onnx_text_parts

    text_onnx = onnx_text_parts(model_dir, artifact) if fmt == "onnx" else None
    if fmt == "hf":  # task, tokenizer and tensors from the folder's JSON (lastmile.models.hf)
        hf, inputs, outputs, missing = manifest_parts(artifact)
    elif text_onnx is not None:
        hf, inputs, outputs, missing = text_onnx
    else:
        try:
            inputs, outputs, missing = read_signature(fmt, artifact)
        except FormatError as exc:
            raise ManifestError(model_dir, "artifact", str(exc)) from exc
    return Manifest(
        name=name,
        path=model_dir,
        format=fmt,
        artifact=artifact,
        backend="auto",
        inputs=inputs,
        outputs=outputs,
        settings={},
        description="",
        from_manifest_file=False,
        missing=missing,
        hf=hf,
    )


# --- writing ----------------------------------------------------------------------------------

def _toml_string(value: str) -> str:
    """A TOML basic string. Written by hand because ``tomli_w`` is not a dependency."""
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def write_manifest(manifest: Manifest) -> str:
    """``model.toml`` text for ``manifest`` (read back by :func:`load_manifest` to the same
    record). ``None`` settings are left out: TOML has no null, and leaving a key out means the
    same thing (not set at this layer)."""
    lines = [
        f"name = {_toml_string(manifest.name)}",
        f"format = {_toml_string(manifest.format)}",
        f"artifact = {_toml_string(_relative_artifact(manifest))}",
        f"backend = {_toml_string(manifest.backend)}",
    ]
    if manifest.description:
        lines.append(f"description = {_toml_string(manifest.description)}")
    if manifest.trust_pickle:
        lines.append("trust_pickle = true")
    settings = {k: v for k, v in manifest.settings.items() if v is not None}
    if settings:
        lines += ["", "[settings]"] + [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    for key, specs in (("inputs", manifest.inputs), ("outputs", manifest.outputs)):
        for spec in specs:
            lines += [
                "",
                f"[[{key}]]",
                f"name = {_toml_string(spec.name)}",
                f"datatype = {_toml_string(spec.datatype)}",
                f"shape = {_toml_value(list(spec.shape))}",
            ] + ([f"range = {_toml_value(list(spec.range))}"] if spec.range else [])
    return "\n".join(lines) + "\n"


def _relative_artifact(manifest: Manifest) -> str:
    artifact = Path(manifest.artifact)
    if not artifact.is_absolute():
        return artifact.as_posix()
    rel = artifact.relative_to(manifest.path)
    return rel.as_posix() if rel.parts else "."
