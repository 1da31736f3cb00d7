"""The two backends against a plain in-process torch computation of the same weights.

Everything here is real: ONNX Runtime sessions, DeepSpeed inference and ZeRO-3 engines, the
demo models built by ``lastmile.models.demo``. The only stand-in is for a GPU, which this CI machine
does not have: one test pretends torch sees a CUDA device to check that the ONNX backend
refuses (instead of falling back to the CPU) when the CUDA provider is missing; the real GPU
tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lastmile.models.demo import example_inputs, reference_module
from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest, TensorSpec
from lastmile.models.store import ModelStore
from lastmile.runtime.backends import BackendError, create_backend, resolve_backend
from lastmile.runtime.backends.onnx_backend import cast_input

KIND = {"demo-mlp": "mlp", "demo-lm": "lm", "demo-mlp-ds": "mlp", "demo-lm-ds": "lm", "demo-mlp-ts": "mlp"}
ONNX_MODELS = ["demo-mlp", "demo-lm"]
DS_MODELS = ["demo-mlp-ds", "demo-lm-ds", "demo-mlp-ts"]
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="module")
def store(demo_store: Path) -> ModelStore:
    """The session's demo models (``demo_store`` in tests/conftest.py); only read here."""
    return ModelStore(demo_store)


_REFERENCE: dict[tuple[str, int], np.ndarray] = {}


def reference(kind: str, batch: int) -> np.ndarray:
    """The demo network run as plain torch in this process (fp32)."""
    if (kind, batch) not in _REFERENCE:
        (array,) = example_inputs(kind, batch).values()
        with torch.no_grad():
            _REFERENCE[kind, batch] = reference_module(kind)(torch.from_numpy(array)).numpy()
    return _REFERENCE[kind, batch]


def readonly_inputs(kind: str, batch: int) -> dict[str, np.ndarray]:
    """Inputs flagged read-only, like the runner's views of shared memory."""
    inputs = example_inputs(kind, batch)
    for array in inputs.values():
        array.flags.writeable = False
    return inputs


def run_model(store: ModelStore, name: str, batch: int = 3, **settings) -> tuple[dict[str, np.ndarray], dict]:
    backend = create_backend(store.get(name), ModelSettings(**settings))
    try:
        inputs = readonly_inputs(KIND[name], batch)
        before = {k: v.copy() for k, v in inputs.items()}
        out = backend.run(inputs)
        for key, value in inputs.items():  # never written into
            np.testing.assert_array_equal(value, before[key])
        return out, backend.info()
    finally:
        backend.close()


def check_output(out: dict[str, np.ndarray], name: str, batch: int, tol: dict) -> np.ndarray:
    (logits,) = out.values()
    assert list(out) == ["logits"]
    assert logits.dtype == np.float32 and logits.flags.c_contiguous
    np.testing.assert_allclose(logits, reference(KIND[name], batch), **tol)
    return logits


# --- ONNX Runtime ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["off", "basic", "extended", "all"])
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_matches_reference_at_every_fusion_level(store: ModelStore, name: str, level: str) -> None:
    out, info = run_model(store, name, graph_fusion=level)
    check_output(out, name, 3, FP32_TOL)
    assert info["providers"] == ["CPUExecutionProvider"]
    expected = {"off": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}[level]
    assert info["graph_optimization_level"] == expected


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_dynamic_batch(store: ModelStore, batch: int) -> None:
    out, _ = run_model(store, "demo-lm", batch=batch)
    check_output(out, "demo-lm", batch, FP32_TOL)


@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_fp16_conversion(store: ModelStore, name: str) -> None:
    fp32, _ = run_model(store, name)
    out, info = run_model(store, name, dtype="fp16")
    assert info["fp16_converted"] is True and info["graph_dtype"] == "fp32"
    logits = check_output(out, name, 3, {"rtol": 1e-2, "atol": 5e-3})
    assert not np.array_equal(logits, fp32["logits"])  # it really ran in fp16


def test_onnx_refuses_bf16(store: ModelStore) -> None:
    with pytest.raises(BackendError, match="onnxruntime backend supports dtype fp32 or fp16"):
        create_backend(store.get("demo-mlp"), ModelSettings(dtype="bf16"))


def test_onnx_threads_and_shrink(store: ModelStore) -> None:
    backend = create_backend(store.get("demo-mlp"), ModelSettings(threads=1))
    try:
        info = backend.info()
        assert info["intra_op_threads"] == 1 and info["inter_op_threads"] == 1
        inputs = readonly_inputs("mlp", 4)
        first = backend.run(inputs)["logits"]
        backend.shrink()  # the next run carries memory.enable_memory_arena_shrinkage
        np.testing.assert_array_equal(backend.run(inputs)["logits"], first)
        np.testing.assert_array_equal(backend.run(inputs)["logits"], first)
        assert backend.memory() == {}  # the CPU arena is inside the process RSS
    finally:
        backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.run(inputs)


def test_onnx_input_casts_and_names(store: ModelStore) -> None:
    backend = create_backend(store.get("demo-lm"), ModelSettings())
    try:
        (ids,) = example_inputs("lm", 2).values()
        out = backend.run({"input_ids": ids.astype(np.int32)})  # widened to the graph's int64
        np.testing.assert_allclose(out["logits"], reference("lm", 2), **FP32_TOL)
        with pytest.raises(BackendError, match="missing input.*input_ids"):
            backend.run({"tokens": ids})
        with pytest.raises(BackendError, match="'input_ids'.*float32"):
            backend.run({"input_ids": ids.astype(np.float32)})
    finally:
        backend.close()


def test_cast_input_never_narrows_ints_silently() -> None:
    small = np.array([1, 2, 3], dtype=np.int64)
    assert cast_input("x", small, np.dtype(np.int32)).dtype == np.int32  # fits: allowed
    with pytest.raises(BackendError, match="'x'.*do not fit.*int32"):
        cast_input("x", np.array([2**40], dtype=np.int64), np.dtype(np.int32))
    same = np.ones(3, np.float32)
    assert cast_input("x", same, np.dtype(np.float32)) is same  # no copy when nothing changes


def test_onnx_refuses_missing_cuda_provider(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for a GPU host with a CPU-only onnxruntime: torch "sees" a CUDA device (the
    one thing this machine cannot have), and the backend must refuse, not run on the CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    import lastmile.runtime.backends.onnx_backend as onnx_backend

    monkeypatch.setattr(onnx_backend, "resolve_device", lambda setting: "cuda:0")
    with pytest.raises(BackendError, match=r"CUDAExecutionProvider.*available: .*CPUExecutionProvider"):
        create_backend(store.get("demo-mlp"), ModelSettings(device="cuda"))


# --- DeepSpeed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["basic", "all"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", DS_MODELS)
def test_deepspeed_matches_reference(store: ModelStore, name: str, dtype: str, level: str) -> None:
    out, info = run_model(store, name, dtype=dtype, graph_fusion=level)
    logits = check_output(out, name, 3, FP32_TOL if dtype == "fp32" else BF16_TOL)
    if dtype == "bf16":
        assert not np.allclose(logits, reference(KIND[name], 3), rtol=0, atol=1e-6)  # really bf16 math
    assert info["engine"] == "init_inference" and info["dtype"] == dtype
    assert info["deepspeed_accelerator"] == ("cuda" if HAS_CUDA else "cpu")
    if name == "demo-mlp-ts" and level == "all":
        assert info["fusion_applied"] == ["torchscript_freeze", "torchscript_optimize_for_inference"]
    else:
        assert info["fusion_applied"] == []  # nothing claimed that was not done
    assert info["fusion_notes"]


def test_deepspeed_shares_readonly_inputs_without_warning(store: ModelStore) -> None:
    backend = create_backend(store.get("demo-lm-ds"), ModelSettings())
    try:
        assert backend.info()["input_copy"] is False  # a torch.export program cannot mutate inputs
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = backend.run(readonly_inputs("lm", 5))
        np.testing.assert_allclose(out["logits"], reference("lm", 5), **FP32_TOL)
        assert backend.memory() == {}  # CPU: DeepSpeed would report the RSS the runner samples
        backend.shrink()
    finally:
        backend.close()


def test_deepspeed_refuses_fp16_on_cpu(store: ModelStore) -> None:
    if HAS_CUDA or torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this host has fp16 math")
    with pytest.raises(BackendError, match="dtype fp16 on the CPU.*bf16"):
        create_backend(store.get("demo-mlp-ds"), ModelSettings(dtype="fp16", device="cpu"))


def test_deepspeed_refuses_tensor_parallel_in_one_process(store: ModelStore) -> None:
    with pytest.raises(BackendError, match="tp_size 2 needs 2 runner processes"):
        create_backend(store.get("demo-mlp-ds"), ModelSettings(tp_size=2))


def test_deepspeed_refuses_torchscript_with_zero(store: ModelStore) -> None:
    with pytest.raises(BackendError, match="offload.*TorchScript"):
        create_backend(store.get("demo-mlp-ts"), ModelSettings(offload="cpu"))


class PickledNet(torch.nn.Module):
    """Module-level so a pickled instance can be loaded back in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2


def _pickle_manifest(tmp_path: Path, trust: bool) -> tuple[Manifest, PickledNet]:
    torch.manual_seed(0)
    net = PickledNet().eval()
    torch.save(net, tmp_path / "model.pt")
    manifest = Manifest(name="pickled", path=tmp_path, format="torch_pickle", artifact=tmp_path / "model.pt",
                        inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),),
                        trust_pickle=trust)
    return manifest, net


def test_pickle_refused_without_trust(tmp_path: Path) -> None:
    manifest, _ = _pickle_manifest(tmp_path, trust=False)
    with pytest.raises(BackendError, match="trust_pickle = true"):
        create_backend(manifest, ModelSettings())


def test_pickle_loads_when_trusted(tmp_path: Path) -> None:
    manifest, net = _pickle_manifest(tmp_path, trust=True)
    backend = create_backend(manifest, ModelSettings())
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(backend.run({"x": x})["y"], expected, **FP32_TOL)
        assert backend.info()["input_copy"] is True  # Python code may write into its inputs
    finally:
        backend.close()


# --- Hugging Face folders ----------------------------------------------------------------------


def _tiny_gpt2(folder: Path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    manifest = Manifest(name="tiny-gpt2", path=folder, format="hf", artifact=folder,
                        inputs=(TensorSpec("input_ids", "INT64", (-1, -1)),),
                        outputs=(TensorSpec("logits", "FP32", (-1, -1, 64)),))
    ids = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int64)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return manifest, ids, expected


def test_hf_folder(tmp_path: Path) -> None:
    manifest, ids, expected = _tiny_gpt2(tmp_path)
    for dtype, tol in (("fp32", FP32_TOL), ("bf16", BF16_TOL)):
        backend = create_backend(manifest, ModelSettings(dtype=dtype))
        try:
            np.testing.assert_allclose(backend.run({"input_ids": ids})["logits"], expected, **tol)
        finally:
            backend.close()


def test_hf_without_transformers_says_install_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    manifest = Manifest(name="hf", path=tmp_path, format="hf", artifact=tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # "not installed"
    with pytest.raises(BackendError, match="`hf` extra"):
        create_backend(manifest, ModelSettings())


# --- choosing the backend and the device -------------------------------------------------------


def _manifest(fmt: str, backend: str = "auto") -> Manifest:
    return Manifest(name="m", path=Path("/nowhere"), format=fmt, artifact=Path("/nowhere/x"), backend=backend)


@pytest.mark.parametrize(
    "fmt, expected",
    [("onnx", "onnxruntime"), ("torch_export", "deepspeed"), ("torchscript", "deepspeed"), ("hf", "deepspeed"),
     ("torch_pickle", "deepspeed")],
)
def test_resolve_backend_auto(fmt: str, expected: str) -> None:
    assert resolve_backend(_manifest(fmt), ModelSettings()) == expected
    assert resolve_backend(_manifest(fmt), ModelSettings(backend=expected)) == expected


def test_resolve_backend_mismatch() -> None:
    with pytest.raises(BackendError, match=r"'deepspeed' cannot load format 'onnx'.*'onnxruntime'"):
        resolve_backend(_manifest("onnx"), ModelSettings(backend="deepspeed"))
    with pytest.raises(BackendError, match=r"'onnxruntime' cannot load format 'torch_export'.*'deepspeed'"):
        resolve_backend(_manifest("torch_export", backend="onnxruntime"), ModelSettings())


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a host without CUDA")
@pytest.mark.parametrize("name", ["demo-mlp", "demo-mlp-ds"])
def test_missing_device(store: ModelStore, name: str) -> None:
    with pytest.raises(BackendError) as err:
        create_backend(store.get(name), ModelSettings(device="cuda"))
    assert str(err.value) == ("device 'cuda' requested but no CUDA device is available; "
                              "use device = \"cpu\" or \"auto\"")


# --- ZeRO-Inference ----------------------------------------------------------------------------


@pytest.mark.zero
@pytest.mark.parametrize("name, dtype", [("demo-lm-ds", "fp32"), ("demo-mlp-ds", "bf16")])
def test_zero_offload(store: ModelStore, name: str, dtype: str) -> None:
    out, info = run_model(store, name, dtype=dtype, offload="cpu")
    check_output(out, name, 3, FP32_TOL if dtype == "fp32" else BF16_TOL)
    assert info["engine"] == "zero3_offload"


@pytest.mark.zero
def test_zero_offload_hf(tmp_path: Path) -> None:
    manifest, ids, expected = _tiny_gpt2(tmp_path)
    backend = create_backend(manifest, ModelSettings(offload="cpu"))
    try:
        np.testing.assert_allclose(backend.run({"input_ids": ids})["logits"], expected, **FP32_TOL)
        # ZeRO-3 really partitioned the weights: outside a forward they hold no data here
        params = list(backend._module.parameters())
        assert params and all(p.numel() == 0 for p in params)
    finally:
        backend.close()


# --- GPU (skipped without CUDA) ----------------------------------------------------------------


@pytest.mark.gpu
@gpu
def test_gpu_onnx_cuda_provider_and_mem_limit(store: ModelStore) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (install onnxruntime-gpu)")
    out, info = run_model(store, "demo-mlp", device="cuda", memory_limit_mb=256)
    check_output(out, "demo-mlp", 3, {"rtol": 1e-4, "atol": 1e-4})
    assert info["providers"][0] == "CUDAExecutionProvider"
    assert info["provider_options"]["gpu_mem_limit"] == 256 * 1024 * 1024
    assert info["provider_options"]["arena_extend_strategy"] == "kSameAsRequested"


@pytest.mark.gpu
@gpu
def test_gpu_deepspeed_memory_fraction(store: ModelStore) -> None:
    backend = create_backend(store.get("demo-lm-ds"), ModelSettings(device="cuda", memory_limit_mb=1024, dtype="fp16"))
    try:
        out = backend.run(readonly_inputs("lm", 3))
        np.testing.assert_allclose(out["logits"], reference("lm", 3), rtol=2e-2, atol=2e-2)
        mem = backend.memory()
        assert mem["device_allocated"] > 0 and mem["device_reserved"] >= mem["device_allocated"]
    finally:
        backend.close()


@pytest.mark.gpu
@gpu
def test_gpu_kernel_inject(tmp_path: Path) -> None:
    manifest, ids, expected = _tiny_gpt2(tmp_path)
    backend = create_backend(manifest, ModelSettings(device="cuda", dtype="fp16", graph_fusion="extended"))
    try:
        info = backend.info()
        assert "deepspeed_kernel_inject" in info["fusion_applied"]
        assert any("replaced" in note for note in info["notes"])
        np.testing.assert_allclose(backend.run({"input_ids": ids})["logits"], expected, rtol=5e-2, atol=5e-2)
    finally:
        backend.close()


def test_bf16_tensors_travel_as_raw_words(tmp_path: Path) -> None:
    """V2 BF16 has no NumPy dtype: inputs arrive and outputs leave as uint16 bit patterns."""
    torch.manual_seed(0)
    net = PickledNet().eval()
    x = torch.randn(3, 4)
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "model.pt2")
    manifest = Manifest(name="bf16-io", path=tmp_path, format="torch_export", artifact=tmp_path / "model.pt2",
                        inputs=(TensorSpec("x", "BF16", (-1, 4)),), outputs=(TensorSpec("y", "BF16", (-1, 2)),))
    backend = create_backend(manifest, ModelSettings(dtype="bf16"))
    try:
        words = x.to(torch.bfloat16).view(torch.uint16).numpy()
        out = backend.run({"x": words})["y"]
        assert out.dtype == np.uint16 and out.shape == (3, 2)
        got = torch.from_numpy(out).view(torch.bfloat16).float()
        with torch.no_grad():
            expected = net.bfloat16()(x.to(torch.bfloat16)).float()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    finally:
        backend.close()
