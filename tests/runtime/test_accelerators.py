"""Host detection for ``GET /lm/v1/system`` and the ``device`` setting's resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lastmile.runtime.accelerators as acc
from lastmile.runtime.accelerators import detect, ensure_ds_accelerator, resolve_device
from lastmile.runtime.backends.base import BackendError

HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[2]


def test_detect_fields_are_present_and_sane() -> None:
    facts = detect()
    cpu = facts["cpu"]
    assert isinstance(cpu["model"], str) and cpu["model"]
    assert cpu["logical_cores"] >= 1
    assert cpu["physical_cores"] is None or 1 <= cpu["physical_cores"] <= cpu["logical_cores"]
    assert 1 <= cpu["usable_cores"] <= cpu["logical_cores"]
    ram = facts["ram"]
    assert 0 < ram["available_bytes"] <= ram["total_bytes"]
    accel = facts["accelerators"]
    assert "CPUExecutionProvider" in accel["onnxruntime_providers"]
    assert accel["devices"][0] == "cpu"
    ds = accel["deepspeed"]
    assert ds["name"] == ("cuda" if HAS_CUDA else "cpu") and ds["device_count"] >= 1
    assert "float32" in ds["supported_dtypes"]
    if HAS_CUDA:
        assert ds["devices"][0]["total_memory_bytes"] > 0
        assert accel["default_device"] == "cuda"
    versions = facts["versions"]
    assert versions["torch"] == torch.__version__
    import deepspeed
    import numpy
    import onnxruntime

    assert versions["deepspeed"] == deepspeed.__version__
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["numpy"] == numpy.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    json.dumps(facts)  # served as JSON as is


def test_detect_is_cached_but_ram_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    first = detect()
    calls = []
    monkeypatch.setattr(acc, "_static_facts", lambda: calls.append(1) or {})
    start = time.perf_counter()
    second = detect()
    assert time.perf_counter() - start < 0.05 and not calls  # no second probe
    assert second["versions"] == first["versions"] and second["accelerators"] == first["accelerators"]
    second["accelerators"]["devices"].append("bogus")  # callers get their own copy
    assert "bogus" not in detect()["accelerators"]["devices"]
    import psutil

    fake = psutil.virtual_memory()._replace(total=1000, available=600)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    assert detect()["ram"] == {"total_bytes": 1000, "available_bytes": 600}  # re-read each call


@pytest.mark.skipif(HAS_CUDA, reason="checks a host without CUDA")
def test_resolve_device_on_a_cpu_host() -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(BackendError) as err:
        resolve_device("cuda")
    assert str(err.value) == ("device 'cuda' requested but no CUDA device is available; "
                              "use device = \"cpu\" or \"auto\"")
    with pytest.raises(BackendError, match="'cuda:1' requested but no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(BackendError, match="'npu' requested but no Ascend NPU device"):
        resolve_device("npu")


def test_resolve_device_with_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for a two-GPU host (this machine has none): only the device count is faked."""
    monkeypatch.setattr(acc, "device_count", lambda kind: {"cpu": 1, "cuda": 2}.get(kind, 0))
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(BackendError, match=r"'cuda:2' requested but only 2 CUDA device\(s\).*cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_ensure_ds_accelerator_keeps_an_operator_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert ensure_ds_accelerator() == "xpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert ensure_ds_accelerator() == ("cuda" if HAS_CUDA else "cpu")
    assert os.environ["DS_ACCELERATOR"] == ("cuda" if HAS_CUDA else "cpu")


def test_fresh_process_pins_deepspeed_before_it_guesses() -> None:
    """In a clean process (DS_ACCELERATOR unset) DeepSpeed must not auto-detect: its guess logs
    a warning on CPU hosts and picks npu whenever torch_npu imports."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import json; from lastmile.runtime.accelerators import detect; "
            "print(json.dumps(detect()['accelerators']['deepspeed']['name']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ("cuda" if HAS_CUDA else "cpu")
    assert "Setting accelerator to CPU" not in proc.stderr + proc.stdout


def test_device_nodes_by_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One place knows the driver's device nodes; the forkserver asks it before choosing
    DS_ACCELERATOR (here against a fake /dev, since the test host may have none)."""
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidia1").touch()
    (tmp_path / "nvidiactl").touch()  # a control node, not a device
    (tmp_path / "davinci0").touch()
    monkeypatch.setattr(acc, "DEVICE_NODE_GLOBS", {"cuda": f"{tmp_path}/nvidia[0-9]*", "npu": f"{tmp_path}/davinci[0-9]*",
                                                   "accel": f"{tmp_path}/accel/accel[0-9]*"})
    assert sorted(acc.device_nodes("cuda")) == [f"{tmp_path}/nvidia0", f"{tmp_path}/nvidia1"]
    assert acc.device_nodes("npu") == [f"{tmp_path}/davinci0"]
    assert acc.device_nodes("accel") == []
    assert len(acc.device_nodes()) == 3
