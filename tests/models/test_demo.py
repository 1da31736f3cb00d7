"""The demo models: deterministic builds, and every artifact computes what the reference
module computes (run directly with onnxruntime / torch here, not through the runtime room)."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lastmile.models import demo
from lastmile.models.demo import DEMO_MODELS, build_demo, example_inputs, reference_module
from lastmile.models.store import ModelStore

# (batch, seq) pairs; seq only matters for the LM. 1 and 64 are the edges of the dynamic dims.
SHAPES = {"mlp": [(1, 0), (3, 0), (32, 0)], "lm": [(1, 1), (3, 7), (2, 64)]}
TENSOR_DEMOS = [name for name, spec in DEMO_MODELS.items() if spec.kind in demo.SIGNATURES]


def run_artifact(store: Path, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    m = ModelStore(store).get(name)
    if m.format == "onnx":
        session = ort.InferenceSession(str(m.artifact), providers=["CPUExecutionProvider"])
        return session.run([m.outputs[0].name], inputs)[0]
    args = [torch.from_numpy(inputs[spec.name]) for spec in m.inputs]
    with torch.no_grad():
        if m.format == "torch_export":
            return torch.export.load(str(m.artifact)).module()(*args).numpy()
        if m.format == "torchscript":
            return torch.jit.load(str(m.artifact))(*args).numpy()
    raise AssertionError(m.format)


def reference(kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return reference_module(kind)(*(torch.from_numpy(v) for v in inputs.values())).numpy()


def test_all_demo_models_listed_with_manifests(demo_store: Path) -> None:
    entries = ModelStore(demo_store).entries()
    assert [e.name for e in entries] == sorted(DEMO_MODELS)
    for e in entries:
        spec = DEMO_MODELS[e.name]
        assert e.ok, e.error
        m = e.manifest
        assert (m.format, m.backend) == (spec.format, spec.backend)
        assert m.from_manifest_file and m.missing == ()
        if spec.kind == "encoder":  # tensors derived from the Hugging Face folder (tests/text covers them)
            assert m.hf.task == "feature-extraction" and m.inputs[0].name == "text_utf8"
            continue
        assert m.inputs == demo.SIGNATURES[spec.kind][0] and m.outputs == demo.SIGNATURES[spec.kind][1]
        assert m.settings["max_batch_size"] == (32 if spec.kind == "mlp" else 8)
    # no leftovers from the temp-folder-and-rename build
    assert sorted(p.name for p in demo_store.iterdir()) == sorted(DEMO_MODELS)


@pytest.mark.parametrize("name", TENSOR_DEMOS)
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_artifact_matches_reference_module(demo_store: Path, name: str) -> None:
    kind = DEMO_MODELS[name].kind
    for batch, seq in SHAPES[kind]:
        inputs = example_inputs(kind, batch, seq=seq or 16)
        out = run_artifact(demo_store, name, inputs)
        want = reference(kind, inputs)
        assert out.shape == want.shape == ((batch, 10) if kind == "mlp" else (batch, seq, 256))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


def test_lm_is_causal() -> None:
    """Changing a later token must not change the logits of earlier positions."""
    ids = example_inputs("lm", 1, seq=10)["input_ids"]
    changed = ids.copy()
    changed[0, 7] = (changed[0, 7] + 1) % 256
    a, b = reference("lm", {"input_ids": ids}), reference("lm", {"input_ids": changed})
    np.testing.assert_array_equal(a[0, :7], b[0, :7])
    assert not np.allclose(a[0, 7:], b[0, 7:])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_build_is_deterministic(demo_store: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    assert build_demo(other) == list(DEMO_MODELS)
    for name, spec in DEMO_MODELS.items():
        assert filecmp.cmp(demo_store / name / "model.toml", other / name / "model.toml", shallow=False)
        if spec.kind == "encoder":  # a Hugging Face folder: the same bytes, file by file
            for rel in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", "modules.json"):
                assert filecmp.cmp(demo_store / name / rel, other / name / rel, shallow=False), rel
            continue
        if spec.format == "onnx":
            assert filecmp.cmp(demo_store / name / spec.artifact, other / name / spec.artifact, shallow=False), name
        inputs = example_inputs(spec.kind, 4, seq=12)
        np.testing.assert_array_equal(run_artifact(demo_store, name, inputs), run_artifact(other, name, inputs))


def test_build_skips_present_and_force_rebuilds(tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert build_demo(store, names=["demo-mlp"]) == ["demo-mlp"]
    before = (store / "demo-mlp" / "model.onnx").stat().st_ino
    assert build_demo(store, names=["demo-mlp"]) == []
    assert build_demo(store, names=["demo-mlp"], force=True) == ["demo-mlp"]
    assert (store / "demo-mlp" / "model.onnx").stat().st_ino != before
    assert sorted(os.listdir(store)) == ["demo-mlp"]
    with pytest.raises(ValueError, match="unknown demo model 'nope'"):
        build_demo(store, names=["nope"])


def test_crash_mid_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def exploding(kind: str, module: torch.nn.Module, path: Path) -> None:
        path.write_bytes(b"half a model")
        raise RuntimeError("disk full")

    monkeypatch.setitem(demo._EXPORTERS, "onnx", exploding)
    store = tmp_path / "s"
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo(store, names=["demo-mlp"])
    assert os.listdir(store) == []


def test_reference_module_is_repeatable_and_leaves_rng_alone() -> None:
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    a, b = reference_module("lm"), reference_module("lm")
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not a.training


def test_example_inputs() -> None:
    x = example_inputs("mlp", 5)["input"]
    assert x.shape == (5, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x, example_inputs("mlp", 5)["input"])
    ids = example_inputs("lm", 2, seq=64)["input_ids"]
    assert ids.shape == (2, 64) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 256
    with pytest.raises(ValueError, match="seq must be 1..64"):
        example_inputs("lm", 1, seq=65)
    with pytest.raises(ValueError, match="unknown demo kind"):
        example_inputs("cnn", 1)
