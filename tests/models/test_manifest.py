"""model.toml validation: every bad value gives its own error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastmile.models.errors import ManifestError, StoreEscapeError
from lastmile.models.manifest import load_manifest, write_manifest
from lastmile.models.spec import TensorSpec
from tests.models.conftest import tensor_tables

GOOD = """\
name = "clf"
format = "torchscript"
artifact = "model.pt"
backend = "deepspeed"
description = "a classifier"

[settings]
max_batch_size = 32
max_delay_ms = 2

""" + tensor_tables({"input": "[-1, 64]"}, {"logits": "[-1, 10]"})


def make(tmp_path: Path, text: str, name: str = "clf", artifact: str = "model.pt") -> Path:
    """A model folder with ``text`` as model.toml. The artifact is dummy bytes: torchscript
    and torch_pickle manifests with explicit tensors never open it while validating."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / artifact).write_bytes(b"not really a model")
    (folder / "model.toml").write_text(text)
    return folder


def test_good_manifest(tmp_path: Path) -> None:
    folder = make(tmp_path, GOOD)
    m = load_manifest(folder, "clf")
    assert m.name == "clf" and m.format == "torchscript" and m.backend == "deepspeed"
    assert m.artifact == folder / "model.pt" and m.path == folder
    assert m.inputs == (TensorSpec("input", "FP32", (-1, 64)),)
    assert m.outputs == (TensorSpec("logits", "FP32", (-1, 10)),)
    assert m.settings == {"max_batch_size": 32, "max_delay_ms": 2.0}
    assert m.from_manifest_file and m.missing == () and m.description == "a classifier"


# (replace this, with that, expected key, words the message must contain)
BAD = {
    "datatype": ('datatype = "FP32"\nshape = [-1, 64]', 'datatype = "FLOAT"\nshape = [-1, 64]',
                 "inputs[0].datatype", "got 'FLOAT'; allowed: BOOL, UINT8"),
    "batch dim fixed": ("shape = [-1, 64]", "shape = [1, 64]", "inputs[0].shape", "dim 0 is the batch dimension"),
    "zero dim": ("shape = [-1, 10]", "shape = [-1, 0]", "outputs[0].shape", "0 is not allowed"),
    "shape not list": ("shape = [-1, 64]", 'shape = "64"', "inputs[0].shape", "a list of integers"),
    "empty shape": ("shape = [-1, 64]", "shape = []", "inputs[0].shape", "a list of integers"),
    "float dim": ("shape = [-1, 64]", "shape = [-1, 6.4]", "inputs[0].shape", "6.4 is not allowed"),
    "unknown key": ('description = "a classifier"', 'descripton = "typo"', "descripton", "unknown key; known: name"),
    "unknown tensor key": ('name = "input"', 'name = "input"\ndtype = "FP32"', "inputs[0].dtype", "unknown key"),
    "missing tensor key": ('name = "logits"\ndatatype = "FP32"', 'name = "logits"', "outputs[0].datatype", "missing"),
    "bad setting value": ("max_batch_size = 32", "max_batch_size = 0", "settings.max_batch_size", "from 1 to 4096"),
    "unknown setting": ("max_batch_size = 32", "max_batchsize = 32", "settings.max_batchsize", "unknown setting"),
    "name mismatch": ('name = "clf"', 'name = "other"', "name", "folder is named 'clf'"),
    "missing artifact": ('artifact = "model.pt"', 'artifact = "nope.pt"', "artifact", "'nope.pt' does not exist"),
    "absolute artifact": ('artifact = "model.pt"', 'artifact = "/etc/passwd"', "artifact", "relative to the model folder"),
    "bad format": ('format = "torchscript"', 'format = "tensorflow"', "format", "allowed: onnx, torch_export"),
    "bad backend": ('backend = "deepspeed"', 'backend = "tensorrt"', "backend", "allowed: auto, deepspeed, onnxruntime"),
    "backend cannot load format": ('backend = "deepspeed"', 'backend = "onnxruntime"', "backend",
                                   "onnxruntime cannot load format torchscript"),
    "settings.backend conflict": ("max_batch_size = 32", 'max_batch_size = 32\nbackend = "onnxruntime"',
                                  "settings.backend", "set it in one place"),
    "pickle refused": ('format = "torchscript"', 'format = "torch_pickle"', "trust_pickle", "trust_pickle = true"),
    "trust_pickle not bool": ('backend = "deepspeed"', 'backend = "deepspeed"\ntrust_pickle = "yes"', "trust_pickle",
                              "allowed: true, false"),
    "duplicate input": ("[[outputs]]", '[[inputs]]\nname = "input"\ndatatype = "FP32"\nshape = [-1]\n\n[[outputs]]',
                        "inputs[1].name", "listed twice"),
    "inputs not tables": ('[[inputs]]\nname = "input"\ndatatype = "FP32"\nshape = [-1, 64]\n', "", "", ""),
    "not toml": ('name = "clf"', 'name = "clf', "", "not valid TOML"),
    "range on a float input": ("shape = [-1, 64]", "shape = [-1, 64]\nrange = [0, 10]", "inputs[0].range", "only an integer input"),
    "empty range": ('datatype = "FP32"\nshape = [-1, 64]', 'datatype = "INT64"\nshape = [-1, 64]\nrange = [5, 5]',
                    "inputs[0].range", "low < high"),
    "range not a pair": ('datatype = "FP32"\nshape = [-1, 64]', 'datatype = "INT64"\nshape = [-1, 64]\nrange = [true, 3]',
                         "inputs[0].range", "low < high"),
    "range on an output": ("shape = [-1, 10]", "shape = [-1, 10]\nrange = [0, 10]", "outputs[0].range", "unknown key"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_names_file_and_key(tmp_path: Path, case: str) -> None:
    old, new, key, words = BAD[case]
    if case == "inputs not tables":
        text, key, words = 'inputs = "x"\n' + GOOD.replace(old, new), "inputs", "array of tables"
    else:
        assert old in GOOD
        text = GOOD.replace(old, new, 1)
    folder = make(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(folder, "clf")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.file == folder / "model.toml"
    assert err.key == key
    assert str(err).startswith(f"{folder / 'model.toml'}: {key + ': ' if key else ''}")
    assert words in str(err)


def test_pickle_refusal_says_why(tmp_path: Path) -> None:
    folder = make(tmp_path, GOOD.replace('format = "torchscript"', 'format = "torch_pickle"'))
    with pytest.raises(ManifestError, match="arbitrary code execution"):
        load_manifest(folder, "clf")


def test_pickle_allowed_when_trusted(tmp_path: Path) -> None:
    text = GOOD.replace('format = "torchscript"', 'format = "torch_pickle"\ntrust_pickle = true')
    m = load_manifest(make(tmp_path, text), "clf")
    assert m.format == "torch_pickle" and m.trust_pickle


def test_artifact_symlink_out_of_folder_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.pt"
    outside.write_bytes(b"x")
    folder = make(tmp_path, GOOD.replace('"model.pt"', '"link.pt"'))
    (folder / "link.pt").symlink_to(outside)
    with pytest.raises(StoreEscapeError, match="outside") as info:
        load_manifest(folder, "clf")
    assert info.value.key == "artifact"


def test_artifact_dotdot_refused(tmp_path: Path) -> None:
    (tmp_path / "other.pt").write_bytes(b"x")
    folder = make(tmp_path, GOOD.replace('"model.pt"', '"../other.pt"'))
    with pytest.raises(StoreEscapeError):
        load_manifest(folder, "clf")


def test_backend_may_be_set_in_settings(tmp_path: Path) -> None:
    text = GOOD.replace('backend = "deepspeed"\n', "").replace("max_batch_size = 32", 'max_batch_size = 32\nbackend = "deepspeed"')
    assert load_manifest(make(tmp_path, text), "clf").backend == "deepspeed"


def test_write_manifest_round_trip(tmp_path: Path) -> None:
    text = GOOD.replace('"a classifier"', '"quotes \\" back\\\\slash\\nnewline \\u0001 ünïcode 😀"')
    folder = make(tmp_path, text.replace("max_delay_ms = 2", "max_delay_ms = 2.5\nmemory_limit_mb = 512"))
    first = load_manifest(folder, "clf")
    (folder / "model.toml").write_text(write_manifest(first))
    again = load_manifest(folder, "clf")
    assert again == first
    (tmp_path / "ranged").mkdir()
    ranged = make(tmp_path / "ranged", GOOD.replace('datatype = "FP32"\nshape = [-1, 64]', 'datatype = "INT64"\nshape = [-1, 64]\nrange = [0, 300]', 1))
    spec = load_manifest(ranged, "clf")
    assert spec.inputs[0].range == (0, 300)
    (ranged / "model.toml").write_text(write_manifest(spec))
    assert load_manifest(ranged, "clf") == spec
    assert "😀" in again.description and "\n" in again.description
