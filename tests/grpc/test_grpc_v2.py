"""KServe V2 gRPC with an unmodified client (tritonclient.grpc): over the Unix socket and over
TCP with the bearer token; answers equal HTTP's; bad input is a status code, never INTERNAL."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from lastmile.appliance.v2codec import decode_response, encode_request
from lastmile.models.demo import example_inputs
from tests.conftest import DaemonProc, free_port, start_tcp_daemon

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "s3cret-token-for-grpc-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, int]]:
    port = free_port()
    d, _ = start_tcp_daemon(tmp_path_factory.mktemp("grpc"), demo_store, TOKEN, server_extra=f"grpc_port = {port}\nmax_body_mb = 1")
    yield d, port
    d.stop()


def _unix(d: DaemonProc) -> "grpcclient.InferenceServerClient":
    return grpcclient.InferenceServerClient(url=f"unix://{d.socket.with_name('lastmile-grpc.sock')}")


def _tcp(port: int) -> "grpcclient.InferenceServerClient":
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def _http_logits_raw(d: DaemonProc, x: np.ndarray) -> np.ndarray:
    import aiohttp

    async def run() -> np.ndarray:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.socket))) as session:
            body, headers = encode_request({"input": x}, {"input": "FP32"})
            async with session.post("http://lastmile/v2/models/demo-mlp/infer", data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                payload = await resp.read()
                return np.array(decode_response(payload, resp.headers.get("Inference-Header-Content-Length"))[0]["logits"])
    return asyncio.run(run())


def test_unix_socket_health_metadata_repository_and_infer_equal_to_http(served: tuple[DaemonProc, int]) -> None:
    d, _ = served
    path = d.socket.with_name("lastmile-grpc.sock")
    assert stat.S_IMODE(path.stat().st_mode) in (0o600, 0o660)
    client = _unix(d)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "lastmile" and "model_repository" in meta.extensions
    client.load_model("demo-mlp")
    assert client.is_model_ready("demo-mlp")
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index["demo-mlp"] == "READY"
    model = client.get_model_metadata("demo-mlp")
    assert model.inputs[0].name == "input" and model.inputs[0].datatype == "FP32" and list(model.inputs[0].shape) == [-1, 64]

    x = example_inputs("mlp", 5)["input"]
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("demo-mlp", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")])
    np.testing.assert_array_equal(result.as_numpy("logits"), _http_logits_raw(d, x))
    assert result.get_response().parameters["batch_size"].int64_param >= 1


def test_typed_contents_equal_raw(served: tuple[DaemonProc, int]) -> None:
    d, _ = served
    from lastmile.appliance.server.grpc import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

    _unix(d).load_model("demo-mlp")
    x = example_inputs("mlp", 3)["input"]
    with grpc.insecure_channel(f"unix:{d.socket.with_name('lastmile-grpc.sock')}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="demo-mlp")
        request.inputs.add(name="input", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.reshape(-1).tolist())
        answer = stub.ModelInfer(request)
    logits = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(list(answer.outputs[0].shape))
    np.testing.assert_array_equal(logits, _http_logits_raw(d, x))


def test_tcp_needs_the_token(served: tuple[DaemonProc, int]) -> None:
    d, port = served
    client = _tcp(port)
    assert client.is_server_live(headers={})  # health is open, as HTTP's /v2/health
    with pytest.raises(InferenceServerException) as wrong:
        client.get_model_metadata("demo-mlp", headers={"authorization": "Bearer wrong-token-wrong-token"})
    assert "UNAUTHENTICATED" in _status(wrong.value)
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("demo-mlp")
    assert "UNAUTHENTICATED" in _status(missing.value)
    client.load_model("demo-mlp", headers=AUTH)
    x = example_inputs("mlp", 2)["input"]
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("demo-mlp", [tensor], headers=AUTH)
    np.testing.assert_array_equal(result.as_numpy("logits"), _http_logits_raw(d, x))


def test_refusals_are_status_codes_never_internal(served: tuple[DaemonProc, int]) -> None:
    d, _ = served
    client = _unix(d)
    client.load_model("demo-mlp")

    def code(fn) -> str:  # noqa: ANN001
        with pytest.raises(InferenceServerException) as caught:
            fn()
        assert "INTERNAL" not in _status(caught.value), caught.value
        return _status(caught.value)

    x = example_inputs("mlp", 2)["input"]
    good = grpcclient.InferInput("input", list(x.shape), "FP32")
    good.set_data_from_numpy(x)
    assert "NOT_FOUND" in code(lambda: client.infer("no-such-model", [good]))
    assert "NOT_FOUND" in code(lambda: client.get_model_metadata("no-such-model"))
    assert "NOT_FOUND" in code(lambda: client.load_model("no-such-model"))
    # wrong shape, wrong datatype, wrong name
    wrong_shape = grpcclient.InferInput("input", [2, 63], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((2, 63), np.float32))
    assert "INVALID_ARGUMENT" in code(lambda: client.infer("demo-mlp", [wrong_shape]))
    wrong_type = grpcclient.InferInput("input", [2, 64], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((2, 64), np.int32))
    assert "INVALID_ARGUMENT" in code(lambda: client.infer("demo-mlp", [wrong_type]))
    wrong_name = grpcclient.InferInput("nope", [2, 64], "FP32")
    wrong_name.set_data_from_numpy(np.zeros((2, 64), np.float32))
    assert "INVALID_ARGUMENT" in code(lambda: client.infer("demo-mlp", [wrong_name]))
    unknown_output = grpcclient.InferRequestedOutput("nope")
    assert "INVALID_ARGUMENT" in code(lambda: client.infer("demo-mlp", [good], outputs=[unknown_output]))
    # over server.max_body_mb (1 MB here): gRPC refuses the message
    big = grpcclient.InferInput("input", [8192, 64], "FP32")
    big.set_data_from_numpy(np.zeros((8192, 64), np.float32))
    assert code(lambda: client.infer("demo-mlp", [big])).split(".")[-1] in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT")
    # a deadline that cannot be met
    assert "DEADLINE_EXCEEDED" in code(lambda: client.infer("demo-mlp", [good], client_timeout=0.000001))
    # the daemon still serves
    assert client.infer("demo-mlp", [good]).as_numpy("logits").shape == (2, 10)


def test_malformed_typed_contents(served: tuple[DaemonProc, int]) -> None:
    d, _ = served
    from lastmile.appliance.server.grpc import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

    _unix(d).load_model("demo-mlp")
    with grpc.insecure_channel(f"unix:{d.socket.with_name('lastmile-grpc.sock')}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        cases = []
        r = pb.ModelInferRequest(model_name="demo-mlp")
        r.inputs.add(name="input", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend([1.0] * 5)  # too few values
        cases.append(r)
        r = pb.ModelInferRequest(model_name="demo-mlp")
        r.inputs.add(name="input", datatype="FP16", shape=[1, 64])  # FP16 has no typed contents
        cases.append(r)
        r = pb.ModelInferRequest(model_name="demo-mlp")
        r.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        r.raw_input_contents.extend([b"\0" * 256, b"extra"])  # more raw contents than inputs
        cases.append(r)
        r = pb.ModelInferRequest(model_name="demo-mlp")
        r.inputs.add(name="input", datatype="FP32", shape=[-5, 64])  # negative dimension
        r.raw_input_contents.append(b"")
        cases.append(r)
        r = pb.ModelInferRequest(model_name="demo-mlp")
        r.inputs.add(name="input", datatype="FP32", shape=[2, 64])
        r.raw_input_contents.append(b"\0" * 100)  # raw bytes that do not fit the shape
        cases.append(r)
        r = pb.ModelInferRequest(model_name="demo-mlp")  # no inputs at all
        cases.append(r)
        for request in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, caught.value)


def test_repository_refusals(served: tuple[DaemonProc, int]) -> None:
    d, _ = served
    from lastmile.appliance.server.grpc import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix:{d.socket.with_name('lastmile-grpc.sock')}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        bad_setting = pb.RepositoryModelLoadRequest(model_name="demo-mlp")
        bad_setting.parameters["max_batch_size"].string_param = "lots"
        bad_config = pb.RepositoryModelLoadRequest(model_name="demo-mlp")
        bad_config.parameters["config"].string_param = "{not json"
        unknown_key = pb.RepositoryModelLoadRequest(model_name="demo-mlp")
        unknown_key.parameters["no_such_setting"].int64_param = 1
        for request in (bad_setting, bad_config, unknown_key):
            with pytest.raises(grpc.RpcError) as caught:
                stub.RepositoryModelLoad(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../etc"))
        assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelReady(pb.ModelReadyRequest(name="no-such-model"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="demo-mlp", version="7"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # a load through the config parameter (Triton's override) takes Lastmile's settings
        ok = pb.RepositoryModelLoadRequest(model_name="demo-mlp")
        ok.parameters["config"].string_param = '{"max_batch_size": 4}'
        stub.RepositoryModelLoad(ok)
        assert stub.ModelReady(pb.ModelReadyRequest(name="demo-mlp")).ready


def test_stream_infer_answers_in_order_and_errors_in_band(served: tuple[DaemonProc, int]) -> None:
    import queue

    d, _ = served
    client = _unix(d)
    client.load_model("demo-mlp")
    answers: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = [example_inputs("mlp", n)["input"] for n in (1, 2, 3)]
        for i, x in enumerate(xs):
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer("demo-mlp", [tensor], request_id=str(i))
        bad = grpcclient.InferInput("input", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        client.async_stream_infer("demo-mlp", [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(got[:3]):
        assert error is None, error
        assert result.get_response().id == str(i)
        np.testing.assert_array_equal(result.as_numpy("logits"), _http_logits_raw(d, xs[i]))
    assert got[3][1] is not None and "shape" in str(got[3][1]).lower()


def test_hostile_requests_never_internal(served: tuple[DaemonProc, int]) -> None:
    """HTTP's hostile cases mirrored: odd datatypes, huge or negative shapes, duplicated inputs,
    out-of-range typed values, parameters pretending to be binary framing, non-UTF-8 names."""
    d, _ = served
    from lastmile.appliance.server.grpc import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

    _unix(d).load_model("demo-mlp")

    def request(**tensor) -> "pb.ModelInferRequest":  # noqa: ANN003
        r = pb.ModelInferRequest(model_name="demo-mlp")
        raw = tensor.pop("raw", None)
        t = r.inputs.add(**{"name": "input", "datatype": "FP32", "shape": [1, 64], **tensor})
        if raw is not None:
            r.raw_input_contents.append(raw)
        return r, t

    cases = []
    for datatype in ("", "FP32x", "BYTES", "INT8", "BF16", "fp32"):
        cases.append(request(datatype=datatype, raw=b"\0" * 256)[0])
    for shape in ([2**62, 64], [1] * 70, [], [-1, 64], [0, 64, 2**40]):
        cases.append(request(shape=shape, raw=b"\0" * 256)[0])
    r, t = request()
    t.contents.int_contents.extend([1000] * 64)  # typed ints for an FP32 input
    cases.append(r)
    r, t = request()
    t.contents.fp32_contents.extend([1.0] * 64)
    t.parameters["binary_data_size"].int64_param = 256  # framing from the client: ignored or refused
    cases.append(r)
    r, _ = request(raw=b"\0" * 256)
    r.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    r.raw_input_contents.append(b"\0" * 256)  # the same input twice
    cases.append(r)
    r, _ = request(name="\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), raw=b"\0" * 256)
    cases.append(r)
    r, t = request()
    t.contents.bytes_contents.append(b"\xff\xfe")  # bytes for a numeric input
    cases.append(r)
    with grpc.insecure_channel(f"unix:{d.socket.with_name('lastmile-grpc.sock')}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for case in cases:
            try:
                stub.ModelInfer(case, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (case, exc)
        # and it still answers
        ok, t = request()
        t.contents.fp32_contents.extend([0.5] * 64)
        assert list(stub.ModelInfer(ok).outputs[0].shape) == [1, 10]


def test_text_model_bytes_equal_http(served: tuple[DaemonProc, int]) -> None:
    """A Hugging Face text model (demo-encoder): BYTES in over gRPC, the same outputs as HTTP's JSON."""
    import aiohttp

    d, _ = served
    client = _unix(d)
    client.load_model("demo-encoder")
    meta = client.get_model_metadata("demo-encoder")
    text_inputs = [t for t in meta.inputs if t.datatype == "BYTES"]
    assert text_inputs, meta
    name = text_inputs[0].name
    texts = ["the daemon answers", "über edge boxes ✓"]

    async def http() -> dict:
        body = {"inputs": [{"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.socket))) as session:
            async with session.post("http://lastmile/v2/models/demo-encoder/infer", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

    expected = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in asyncio.run(http())["outputs"]}
    tensor = grpcclient.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    result = client.infer("demo-encoder", [tensor])
    for out_name, want in expected.items():
        got = result.as_numpy(out_name)
        if got.dtype == np.object_:
            assert [g.decode() for g in got.reshape(-1)] == [str(w) for w in want.reshape(-1)]
        else:
            np.testing.assert_allclose(got, want.astype(got.dtype), rtol=1e-6, atol=1e-6)


def test_model_config_as_triton_describes_it(served: tuple[DaemonProc, int]) -> None:
    d, _ = served
    client = _unix(d)
    client.load_model("demo-mlp")
    config = client.get_model_config("demo-mlp", as_json=True)["config"]
    assert config["name"] == "demo-mlp" and config["max_batch_size"] >= 1
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_config("no-such-model")
    assert "NOT_FOUND" in _status(caught.value)


def test_statistics_equal_http(served: tuple[DaemonProc, int]) -> None:
    import json as _json

    import aiohttp

    d, _ = served
    client = _unix(d)
    client.load_model("demo-mlp")
    x = example_inputs("mlp", 2)["input"]
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client.infer("demo-mlp", [tensor])
    stats = client.get_inference_statistics("demo-mlp", as_json=True)["model_stats"][0]

    async def http() -> dict:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(d.socket))) as session:
            async with session.get("http://lastmile/v2/models/demo-mlp/stats") as resp:
                return _json.loads(await resp.read())["model_stats"][0]

    want = asyncio.run(http())
    assert stats["name"] == "demo-mlp" and int(stats["inference_count"]) == want["inference_count"] >= 2
    assert int(stats["inference_stats"]["success"]["count"]) == want["inference_stats"]["success"]["count"]
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert "demo-mlp" in {m["name"] for m in every}
