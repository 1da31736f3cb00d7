"""Generation over Triton's ModelStreamInfer (decoupled): tritonclient.grpc's stream, the tiny
LM, the same text as HTTP's /v2/models/{name}/generate; refusals in band, named."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import numpy as np
import pytest

from lastmile.runtime.generation.tiny import build_tiny_lm
from tests.conftest import DaemonProc, start_daemon

grpcclient = pytest.importorskip("tritonclient.grpc")

MODEL = "tiny"


@pytest.fixture(scope="module")
def served(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    home = tmp_path_factory.mktemp("grpc-gen")
    store = home / "store"
    shutil.copytree(demo_store, store)
    build_tiny_lm(store / MODEL)
    daemon = start_daemon(home / "d", store)
    try:
        status, body = asyncio.run(_post(daemon, f"/v2/repository/models/{MODEL}/load",
                                         {"parameters": {"engine": "deepspeed", "precision": "fp32", "max_num_seqs": 4}}))
        assert status == 200, body
        yield daemon
    finally:
        daemon.stop()


async def _post(daemon: DaemonProc, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
        async with s.post("http://localhost" + path, json=body) as resp:
            return resp.status, json.loads(await resp.read())


def _stream(daemon: DaemonProc, requests: list[dict[str, Any]]) -> list[list[tuple[Any, Any]]]:
    client = grpcclient.InferenceServerClient(url=f"unix://{daemon.socket.with_name('lastmile-grpc.sock')}")
    answers: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    out: list[list[tuple[Any, Any]]] = []
    try:
        for req in requests:
            text = grpcclient.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([req["text"].encode()], dtype=np.object_))
            client.async_stream_infer(MODEL, [text], request_id=req.get("id", ""), parameters=req.get("parameters"))
            got = []
            while True:
                result, error = answers.get(timeout=60)
                got.append((result, error))
                if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
                    break
            out.append(got)
    finally:
        client.stop_stream()
    return out


def test_stream_equals_http_generate(served: DaemonProc) -> None:
    params = {"max_tokens": 12, "temperature": 0}
    status, http = asyncio.run(_post(served, f"/v2/models/{MODEL}/generate", {"text_input": "The capital of France is", "parameters": params}))
    assert status == 200, http
    (got,) = _stream(served, [{"text": "The capital of France is", "parameters": params, "id": "a"}])
    assert all(error is None for _, error in got)
    pieces = [r.as_numpy("text_output")[0].decode() for r, _ in got]
    assert len(got) >= 2  # streamed: more than one answer
    assert "".join(pieces) == http["text_output"]
    last = got[-1][0].get_response()
    assert last.id == "a"
    assert last.parameters["finish_reason"].string_param == http["finish_reason"]
    assert last.parameters["completion_tokens"].int64_param == http["completion_tokens"]


def test_refusals_in_band(served: DaemonProc) -> None:
    got = _stream(served, [
        {"text": "hi", "parameters": {"max_tokens": -3}},
        {"text": "hi", "parameters": {"no_such_setting": 1}},
        {"text": "hi", "parameters": {"max_tokens": 2, "temperature": 0}},
    ])
    for answers in got[:2]:
        ((_, error),) = answers
        assert error is not None and "INTERNAL" not in str(error)
    assert "max_tokens" in str(got[0][0][1]) and "no_such_setting" in str(got[1][0][1])
    assert got[2][-1][1] is None  # the stream went on
