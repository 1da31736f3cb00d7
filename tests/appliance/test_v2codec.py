"""V2 tensor decoding: every malformed or mismatched input is a BadRequest naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lastmile.appliance.v2codec import BadRequest, InferRequest, bf16_to_float, decode_request, encode_response, split_body
from lastmile.models.spec import TensorSpec

SPECS = (TensorSpec("input", "FP32", (-1, 4)), TensorSpec("mask", "BOOL", (-1, 4)))
OUTS = ["logits"]


def good(**changes: object) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}
    tensor.update(changes)
    return {"inputs": [tensor, {"name": "mask", "datatype": "BOOL", "shape": [2, 4], "data": [True, False] * 4}]}


def test_json_decodes_to_arrays() -> None:
    req = decode_request(good(), memoryview(b""), SPECS, OUTS)
    assert req.inputs["input"].dtype == np.float32 and req.inputs["input"].shape == (2, 4)
    assert req.inputs["mask"].dtype == np.bool_
    nested = decode_request(good(data=[[0, 1, 2, 3], [4, 5, 6, 7]]), memoryview(b""), SPECS, OUTS)
    assert np.array_equal(nested.inputs["input"], req.inputs["input"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "nope"}, "inputs[0].name"),
        ({"datatype": "FP64"}, "inputs[0].datatype"),
        ({"shape": [2, 5]}, "inputs[0].shape"),
        ({"shape": [8]}, "inputs[0].shape"),
        ({"shape": [2, -4]}, "inputs[0].shape"),
        ({"shape": "2x4"}, "inputs[0].shape"),
        ({"data": list(range(7))}, "inputs[0].data"),
        ({"data": ["a"] * 8}, "inputs[0].data"),
        ({"data": 3}, "inputs[0].data"),
    ],
)
def test_bad_tensor_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(good(**change), memoryview(b""), SPECS, OUTS)
    assert info.value.field == field


def test_missing_duplicate_and_batch_mismatch() -> None:
    body = good()
    with pytest.raises(BadRequest, match="missing input"):
        decode_request({"inputs": body["inputs"][:1]}, memoryview(b""), SPECS, OUTS)
    with pytest.raises(BadRequest, match="given twice"):
        decode_request({"inputs": [body["inputs"][0], body["inputs"][0]]}, memoryview(b""), SPECS, OUTS)
    body["inputs"][1].update(shape=[1, 4], data=[True] * 4)
    with pytest.raises(BadRequest, match="batch dimension"):
        decode_request(body, memoryview(b""), SPECS, OUTS)
    with pytest.raises(BadRequest) as info:
        decode_request({"inputs": []}, memoryview(b""), SPECS, OUTS)
    assert info.value.field == "inputs"
    with pytest.raises(BadRequest) as info:
        decode_request({**good(), "outputs": [{"name": "x"}]}, memoryview(b""), SPECS, OUTS)
    assert info.value.field == "outputs[0].name"


def test_binary_extension_round_trip() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    m = np.ones((2, 4), dtype=np.bool_)
    header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": x.nbytes}},
            {"name": "mask", "datatype": "BOOL", "shape": [2, 4], "parameters": {"binary_data_size": m.nbytes}},
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header).encode()
    parsed, binary = split_body(text + x.tobytes() + m.tobytes(), str(len(text)))
    req = decode_request(parsed, binary, SPECS, OUTS)
    assert np.array_equal(req.inputs["input"], x) and req.binary_outputs == {"logits"}
    body, headers = encode_response("m", req, {"logits": x * 2}, (TensorSpec("logits", "FP32", (-1, 4)),), {"batch_id": 1})
    n = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    assert np.array_equal(np.frombuffer(body[n:], dtype=np.float32).reshape(2, 4), x * 2)


@pytest.mark.parametrize(
    ("header_length", "extra", "words"),
    [("abc", b"", "must be an integer"), ("100000", b"", "body has"), (None, b"", None)],
)
def test_binary_framing_errors(header_length: str | None, extra: bytes, words: str | None) -> None:
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}
    text = json.dumps(header).encode()
    if words is None:  # binary size claimed but no bytes after the header
        parsed, binary = split_body(text, str(len(text)))
        with pytest.raises(BadRequest, match="past the end"):
            decode_request(parsed, binary, SPECS[:1], OUTS)
        return
    with pytest.raises(BadRequest, match=words):
        split_body(text + extra, header_length)


def test_size_mismatch_and_unclaimed_bytes() -> None:
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 12}}]}
    text = json.dumps(header).encode()
    parsed, binary = split_body(text + bytes(12), str(len(text)))
    with pytest.raises(BadRequest, match="needs 16"):
        decode_request(parsed, binary, SPECS[:1], OUTS)
    header["inputs"][0]["parameters"]["binary_data_size"] = 16
    text = json.dumps(header).encode()
    parsed, binary = split_body(text + bytes(20), str(len(text)))
    with pytest.raises(BadRequest, match="not claimed"):
        decode_request(parsed, binary, SPECS[:1], OUTS)


def test_malformed_json_and_depth() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        split_body(b"{nope", None)
    with pytest.raises(BadRequest, match="JSON object"):
        split_body(b"[1]", None)
    deep = "[" * 100 + "]" * 100
    with pytest.raises(BadRequest, match="nested deeper"):
        split_body(('{"inputs": ' + deep + "}").encode(), None)


def test_bf16_json_is_rounded_to_bfloat16() -> None:
    req = decode_request(
        {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 2], "data": [1.0, 3.140625]}]},
        memoryview(b""), (TensorSpec("x", "BF16", (-1, 2)),), ["y"],
    )
    assert np.allclose(bf16_to_float(req.inputs["x"]), [1.0, 3.140625])


def test_json_response_shape() -> None:
    req = InferRequest("abc", {}, {}, None)
    body, headers = encode_response("m", req, {"logits": np.ones((1, 2), np.float32)}, (TensorSpec("logits", "FP32", (-1, 2)),), {})
    data = json.loads(body)
    assert headers["Content-Type"] == "application/json"
    assert data == {"model_name": "m", "model_version": "1", "id": "abc", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}]}


def _json_response(outputs: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> dict:
    request = InferRequest(id="r", inputs={}, parameters={}, requested_outputs=None)
    body, headers = encode_response("m", request, outputs, specs, {"batch_size": 1})
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


def test_json_floats_are_the_shortest_text_of_their_own_type() -> None:
    """orjson writes float32 as the shortest text that reads back to the same float32 (no
    float64 widening): fewer bytes, same bits for a client reading the declared type."""
    values = np.array([0.1, -0.0, 1e-7, 3.4e38, 1 / 3], np.float32)
    request = InferRequest(id=None, inputs={}, parameters={}, requested_outputs=None)
    body, _ = encode_response("m", request, {"y": values}, (TensorSpec("y", "FP32", (-1,)),), {})
    assert b'"data":[0.1,-0.0,1e-7,3.4e+38,0.33333334]' in body
    back = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)
    assert back.tobytes() == values.tobytes()


def test_non_finite_outputs_keep_their_names_not_null() -> None:
    """NaN and infinities are written as the json module did (NaN, Infinity), not as null."""
    values = np.array([[np.nan, np.inf], [-np.inf, 1.5]], np.float32)
    answer = _json_response({"y": values}, (TensorSpec("y", "FP32", (-1, 2)),))
    got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(2, 2)
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[1, 0] == -np.inf and got[1, 1] == 1.5


def test_json_request_orjson_refuses_falls_back_with_the_same_errors() -> None:
    """A NaN literal parses as before; an integer past 64 bits is a 400 naming its field."""
    header, _ = split_body(b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [NaN, 1, 2, 3]}]}', None)
    assert np.isnan(header["inputs"][0]["data"][0])
    specs = (TensorSpec("ids", "UINT64", (-1,)),)
    header, rest = split_body(b'{"inputs": [{"name": "ids", "datatype": "UINT64", "shape": [1], "data": [18446744073709551616]}]}', None)
    with pytest.raises(BadRequest) as info:
        decode_request(header, rest, specs, OUTS)
    assert info.value.field == "inputs[0].data"
