"""Format detection and signature inference for folders without model.toml."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from lastmile.models.errors import FormatError, ManifestError
from lastmile.models.formats import detect_format, infer_signature
from lastmile.models.manifest import load_manifest
from lastmile.models.spec import TensorSpec


def folder_with(tmp_path: Path, src: Path, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(src, folder / src.name)
    return folder


def test_onnx_signature_inferred_without_manifest(tmp_path: Path, demo_store: Path) -> None:
    folder = folder_with(tmp_path, demo_store / "demo-lm" / "model.onnx")
    m = load_manifest(folder, "m")
    assert not m.from_manifest_file
    assert m.format == "onnx" and m.artifact == folder / "model.onnx" and m.backend == "auto"
    assert m.inputs == (TensorSpec("input_ids", "INT64", (-1, -1)),)
    assert m.outputs == (TensorSpec("logits", "FP32", (-1, -1, 256)),)
    assert m.missing == ()


def test_onnx_mlp_signature(demo_store: Path) -> None:
    inputs, outputs, missing = infer_signature("onnx", demo_store / "demo-mlp" / "model.onnx")
    assert inputs == (TensorSpec("input", "FP32", (-1, 64)),)
    assert outputs == (TensorSpec("logits", "FP32", (-1, 10)),)
    assert missing == ()


def test_onnx_fixed_batch_and_unsupported_type_are_reported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["s"], ["t"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, "n", 3]),
         helper.make_tensor_value_info("s", TensorProto.STRING, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, "n", 3]),
         helper.make_tensor_value_info("t", TensorProto.STRING, ["b"])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), path)
    inputs, outputs, missing = infer_signature("onnx", path)
    assert inputs == (TensorSpec("x", "FP16", (1, -1, 3)),)
    assert outputs == (TensorSpec("y", "FP16", (1, -1, 3)),)
    text = " | ".join(missing)
    assert "input 's' has ONNX type STRING" in text
    assert "input 'x' has a fixed batch dimension of 1" in text


def test_corrupt_onnx_is_a_manifest_error(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ManifestError, match="could not read ONNX file") as info:
        load_manifest(folder, "m")
    assert info.value.key == "artifact"


def test_pt2_signature_inferred_without_manifest(tmp_path: Path, demo_store: Path) -> None:
    folder = folder_with(tmp_path, demo_store / "demo-lm-ds" / "model.pt2")
    m = load_manifest(folder, "m")
    assert not m.from_manifest_file and m.format == "torch_export"
    assert m.inputs == (TensorSpec("input_ids", "INT64", (-1, -1)),)
    assert m.outputs == (TensorSpec("output", "FP32", (-1, -1, 256)),)
    assert len(m.missing) == 1 and "output names are not stored" in m.missing[0]


def test_pt2_dict_output_names_and_static_dims(tmp_path: Path) -> None:
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"double": x * 2, "total": x.sum(dim=1, keepdim=True).to(torch.float64)}

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Two(), (torch.ones(2, 3),), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "two.pt2"
    torch.export.save(program, path)
    inputs, outputs, missing = infer_signature("torch_export", path)
    assert inputs == (TensorSpec("x", "FP32", (-1, 3)),)
    assert outputs == (TensorSpec("double", "FP32", (-1, 3)), TensorSpec("total", "FP64", (-1, 1)))
    assert missing == ()


def test_torchscript_has_no_signature(tmp_path: Path, demo_store: Path) -> None:
    folder = folder_with(tmp_path, demo_store / "demo-mlp-ts" / "model.pt")
    m = load_manifest(folder, "m")
    assert m.format == "torchscript" and m.inputs == () and m.outputs == ()
    assert "add [[inputs]] and [[outputs]] to model.toml" in m.missing[0]


def test_manifest_without_tensors_infers_them(tmp_path: Path, demo_store: Path) -> None:
    folder = folder_with(tmp_path, demo_store / "demo-mlp" / "model.onnx")
    (folder / "model.toml").write_text("[settings]\nmax_batch_size = 4\n")
    m = load_manifest(folder, "m")
    assert m.from_manifest_file and m.format == "onnx" and m.settings == {"max_batch_size": 4}
    assert m.inputs == (TensorSpec("input", "FP32", (-1, 64)),) and m.missing == ()


def test_manifest_with_inputs_only_says_outputs_missing(tmp_path: Path, demo_store: Path) -> None:
    folder = folder_with(tmp_path, demo_store / "demo-mlp-ts" / "model.pt")
    (folder / "model.toml").write_text('[[inputs]]\nname = "input"\ndatatype = "FP32"\nshape = [-1, 64]\n')
    m = load_manifest(folder, "m")
    assert m.outputs == () and m.missing == ("outputs unknown: add [[outputs]] to model.toml",)


def test_pickled_module_without_manifest_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(torch.nn.Linear(2, 2), folder / "model.pt")
    assert detect_format(folder) == ("torch_pickle", folder / "model.pt")
    with pytest.raises(ManifestError, match="arbitrary code execution") as info:
        load_manifest(folder, "m")
    assert info.value.key == "trust_pickle" and "trust_pickle = true" in str(info.value)


def test_detect_nothing_lists_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"no model artifact found .*found: README.md, weights.bin"):
        detect_format(tmp_path)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path, "m")
    assert info.value.key == "format" and "README.md" in str(info.value)


def test_detect_ambiguous_lists_candidates(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    (tmp_path / "b.pt2").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"a.onnx \(onnx\), b.pt2 \(torch_export\)"):
        detect_format(tmp_path)
    assert detect_format(tmp_path, want="onnx") == ("onnx", tmp_path / "a.onnx")


def test_detect_hf_folder_and_bin_hint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="no \\*.safetensors"):
        detect_format(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert detect_format(tmp_path) == ("hf", tmp_path)
    m = load_manifest(tmp_path, "m")
    assert m.format == "hf" and m.artifact == tmp_path and m.inputs == ()
    assert "add [[inputs]] and [[outputs]]" in m.missing[0]


def test_torchscript_told_from_pickle_by_zip_listing(tmp_path: Path) -> None:
    ts = tmp_path / "a.ts"
    with zipfile.ZipFile(ts, "w") as z:
        z.writestr("a/code/__torch__/m.py", "")
        z.writestr("a/constants.pkl", "")
    assert detect_format(tmp_path) == ("torchscript", ts)
