"""Graph fusion: each level really changes the ONNX Runtime session (asserted on the live
session's own options, not on what the backend says it asked for: tests/runtime/test_backends.py
covers the reported level and outputs against the torch reference), and outputs agree across
levels. GPU paths (kernel injection, device caps) are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lastmile.models.demo import example_inputs
from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.backends import create_backend

LEVELS = {"off": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def test_each_fusion_level_sets_the_live_session_and_outputs_agree(demo_store: Path) -> None:
    import onnxruntime as ort

    manifest = ModelStore(demo_store).get("demo-lm")
    inputs = example_inputs("lm", 2, seq=8)
    outputs = {}
    for level, enum_name in LEVELS.items():
        backend = create_backend(manifest, ModelSettings(graph_fusion=level))
        try:
            live = backend.session.get_session_options().graph_optimization_level
            assert live == getattr(ort.GraphOptimizationLevel, enum_name), (level, live)
            outputs[level] = backend.run(inputs)["logits"]
        finally:
            backend.close()
    for level, out in outputs.items():
        np.testing.assert_allclose(out, outputs["off"], rtol=1e-4, atol=1e-4, err_msg=level)


@pytest.mark.gpu
def test_gpu_memory_limit_caps_the_device_allocator(demo_store: Path) -> None:
    """On CUDA the cap is the device allocator's (no RLIMIT_AS: the driver reserves terabytes
    of address space): the runner reports ``device_allocator`` and torch's fraction is set."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    manifest = ModelStore(demo_store).get("demo-mlp-ds")
    backend = create_backend(manifest, ModelSettings(device="cuda", memory_limit_mb=512))
    try:
        backend.run(example_inputs("mlp", 2))
        assert backend.info()["hard_cap"]["kind"] == "device_allocator"
    finally:
        backend.close()
