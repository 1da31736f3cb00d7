"""Triton's statistics extension, read by NVIDIA's own client (tritonclient,
unchanged) over the TCP listener: the counts and cumulative times move with real requests,
failures count as ``fail``, and the shape is Triton's."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests.conftest import DaemonProc, start_tcp_daemon

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "stats-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def stats_daemon(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, int]]:
    d, port = start_tcp_daemon(tmp_path_factory.mktemp("stats"), demo_store, TOKEN)
    yield d, port
    d.stop()


def _infer(client: "httpclient.InferenceServerClient", model: str, name: str, array: np.ndarray, datatype: str) -> None:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    client.infer(model, [tensor], headers=dict(AUTH))


def test_statistics_count_requests_rows_batches_and_failures(stats_daemon: tuple[DaemonProc, int]) -> None:
    _, port = stats_daemon
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    client.load_model("demo-mlp", headers=dict(AUTH))
    client.load_model("demo-lm", headers=dict(AUTH))
    fresh = client.get_inference_statistics("demo-mlp", headers=dict(AUTH))["model_stats"][0]
    assert fresh["name"] == "demo-mlp" and fresh["version"] == "1"
    assert fresh["inference_count"] == 0 and fresh["last_inference"] == 0
    assert all(fresh["inference_stats"][k] == {"count": 0, "ns": 0} for k in DURATIONS)

    rng = np.random.default_rng(0)
    for rows in (1, 2, 3):
        _infer(client, "demo-mlp", "input", rng.standard_normal((rows, 64)).astype(np.float32), "FP32")
    for _ in range(2):  # token ids past the vocabulary: ONNX Runtime fails the batch
        with pytest.raises(InferenceServerException):
            _infer(client, "demo-lm", "input_ids", np.full((1, 8), 100_000, np.int64), "INT64")

    stats = client.get_inference_statistics("demo-mlp", headers=dict(AUTH))["model_stats"][0]
    inference = stats["inference_stats"]
    assert stats["inference_count"] == 6  # rows, as Triton counts them
    assert stats["execution_count"] == 3  # one batch each: sent one after another
    assert stats["last_inference"] > 0
    assert inference["success"]["count"] == 3 and inference["fail"]["count"] == 0
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == 3, key
    # cumulative times are real durations: infer takes time, and the parts are within the whole
    assert inference["compute_infer"]["ns"] > 0 and inference["compute_input"]["ns"] > 0
    assert inference["queue"]["ns"] + inference["compute_infer"]["ns"] <= inference["success"]["ns"]

    lm = client.get_inference_statistics("demo-lm", model_version="1", headers=dict(AUTH))["model_stats"][0]
    assert lm["inference_stats"]["fail"]["count"] == 2 and lm["inference_stats"]["fail"]["ns"] > 0
    assert lm["inference_stats"]["success"]["count"] == 0 and lm["inference_count"] == 0

    every = client.get_inference_statistics(headers=dict(AUTH))["model_stats"]
    assert [s["name"] for s in every] == ["demo-lm", "demo-mlp"]

    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_inference_statistics("demo-mlp-ds", headers=dict(AUTH))
    with pytest.raises(InferenceServerException, match="no version"):
        client.get_inference_statistics("demo-mlp", model_version="2", headers=dict(AUTH))
