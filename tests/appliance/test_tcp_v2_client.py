"""A standard KServe V2 client (NVIDIA's tritonclient, unchanged) over the TCP listener with a
bearer token: the protocol is the real one, not our own reading of it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lastmile.models.demo import example_inputs, reference_module
from tests.conftest import DaemonProc, start_tcp_daemon

httpclient = pytest.importorskip("tritonclient.http")
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def tcp_daemon(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, int]]:
    d, port = start_tcp_daemon(tmp_path_factory.mktemp("tcp"), demo_store, TOKEN)
    yield d, port
    d.stop()


def test_tritonclient_over_tcp_works_unchanged(tcp_daemon: tuple[DaemonProc, int]) -> None:
    daemon, port = tcp_daemon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready()
    client.load_model("demo-mlp", headers=auth)
    assert client.is_model_ready("demo-mlp", headers=auth)
    meta = client.get_model_metadata("demo-mlp", headers=auth)
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 64]}

    import torch

    x = example_inputs("mlp", 5)["input"]
    with torch.no_grad():
        expected = reference_module("mlp")(torch.from_numpy(x)).numpy()
    for binary in (True, False):
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = httpclient.InferRequestedOutput("logits", binary_data=binary)
        # tritonclient writes its framing header into the dict it is given: pass a fresh one
        result = client.infer("demo-mlp", [tensor], outputs=[wanted], headers=dict(auth))
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)
    client.unload_model("demo-mlp", headers=auth)
    assert not client.is_model_ready("demo-mlp", headers=auth)


def test_tcp_needs_the_token(tcp_daemon: tuple[DaemonProc, int]) -> None:
    _, port = tcp_daemon
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="401|token|uthoriz"):
        client.get_model_metadata("demo-mlp")
    with pytest.raises(InferenceServerException, match="401|token|uthoriz"):
        client.get_model_metadata("demo-mlp", headers={"Authorization": "Bearer wrong"})
