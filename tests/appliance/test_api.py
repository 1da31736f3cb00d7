"""The API over the real socket of a real daemon, every answer checked against the OpenAPI
document (appliance/server/openapi.yaml)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import numpy as np
import pytest
import yaml
from openapi_spec_validator import validate as validate_spec

from lastmile.appliance.client.api import ApiError, LastmileClient
from lastmile.models.demo import example_inputs, reference_module
from tests.conftest import ROOT, DaemonProc, get_error

SPEC = yaml.safe_load((ROOT / "appliance" / "server" / "openapi.yaml").read_text())


def _jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema: ``nullable`` becomes a null type, refs stay local."""
    if isinstance(node, dict):
        out = {k: _jsonschema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable"):
            if "type" in out:
                out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        return out
    if isinstance(node, list):
        return [_jsonschema(v) for v in node]
    return node


COMPONENTS = _jsonschema(copy.deepcopy(SPEC["components"]))


def _template(path: str) -> tuple[str, dict[str, Any]]:
    """The OpenAPI path template matching a concrete path; a literal segment wins over a
    parameter, as OpenAPI says (``/v2/models/stats`` is not ``/v2/models/{name}``)."""
    parts = path.split("?")[0].strip("/").split("/")
    matches = []
    for template, item in SPEC["paths"].items():
        tparts = template.strip("/").split("/")
        if len(tparts) == len(parts) and all(t.startswith("{") or t == p for t, p in zip(tparts, parts)):
            matches.append((sum(not t.startswith("{") for t in tparts), template, item))
    if not matches:
        raise AssertionError(f"{path} is not in the OpenAPI document")
    _, template, item = max(matches, key=lambda m: m[0])
    return template, item


def check_against_spec(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    template, item = _template(path)
    operation = item.get(method.lower())
    assert operation, f"{method} {template} is not in the OpenAPI document"
    response = operation["responses"].get(str(status))
    assert response, f"{method} {template} answered {status}, which the document does not list"
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    if "content" not in response:
        assert body == b"", f"{method} {template} {status} should have an empty body"
        return
    media = content_type.split(";")[0]
    assert media in response["content"], f"{method} {template} {status}: {media} not documented"
    if media == "application/json":
        schema = _jsonschema(response["content"][media]["schema"])
        jsonschema.validate(json.loads(body), {**schema, "components": COMPONENTS})


async def call(daemon: DaemonProc, method: str, path: str, *, body: Any = None, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as session:
        async with session.request(method, "http://localhost" + path, json=body, data=data, headers=headers) as resp:
            payload = await resp.read()
            check_against_spec(method, path, resp.status, resp.headers.get("Content-Type", ""), payload)
            return resp.status, dict(resp.headers), payload


def test_openapi_document_is_valid() -> None:
    validate_spec(SPEC)


async def test_health_and_server_metadata(daemon: DaemonProc) -> None:
    assert (await call(daemon, "GET", "/v2/health/live"))[0] == 200
    assert (await call(daemon, "GET", "/v2/health/ready"))[0] == 200
    status, _, body = await call(daemon, "GET", "/v2")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "lastmile" and "model_repository" in meta["extensions"]


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/versions/1", "/lm/v1/models/nope"])
async def test_unknown_model_is_404_json(daemon: DaemonProc, path: str) -> None:
    status, _, body = await call(daemon, "GET", path)
    assert status == 404 and "nope" in json.loads(body)["error"]


async def test_unknown_route_is_json_404(daemon: DaemonProc) -> None:
    status, error = await get_error(daemon.socket, "/v3/whatever")
    assert status == 404 and "no such endpoint" in error


async def test_system_facts(daemon: DaemonProc) -> None:
    status, _, body = await call(daemon, "GET", "/lm/v1/system")
    facts = json.loads(body)
    assert status == 200
    assert facts["cpu"]["logical_cores"] >= 1 and facts["ram"]["total_bytes"] > 0
    assert "CPUExecutionProvider" in facts["accelerators"]["onnxruntime_providers"]
    assert facts["accelerators"]["deepspeed"]["name"] == ("cuda" if facts["accelerators"]["default_device"] == "cuda" else "cpu")
    assert {"torch", "deepspeed", "onnxruntime"} <= set(facts["versions"])
    maps = Path(f"/proc/{facts['daemon']['pid']}/maps").read_text()
    assert "libtorch" not in maps, "host facts come from a forkserver child; the daemon never loads torch"


async def test_load_infer_unload_on_both_backends(daemon: DaemonProc) -> None:
    """Numbers from the daemon equal a plain in-process torch computation, on ORT and DeepSpeed."""
    import torch

    x = example_inputs("mlp", 3)["input"]
    with torch.no_grad():
        expected = reference_module("mlp")(torch.from_numpy(x)).numpy()
    for name in ("demo-mlp", "demo-mlp-ds"):
        status, _, body = await call(daemon, "POST", f"/v2/repository/models/{name}/load", body={"parameters": {"max_batch_size": 16}})
        assert status == 200, body
        assert json.loads(body)["settings"]["max_batch_size"] == 16
        status, _, body = await call(daemon, "GET", f"/v2/models/{name}")
        assert json.loads(body)["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert (await call(daemon, "GET", f"/v2/models/{name}/ready"))[0] == 200
        # JSON tensors
        request = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 64], "data": x.reshape(-1).tolist()}]}
        status, _, body = await call(daemon, "POST", f"/v2/models/{name}/infer", body=request)
        answer = json.loads(body)
        assert status == 200 and answer["id"] == "r1" and answer["model_name"] == name
        got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        # the binary extension, through the client
        async with LastmileClient(daemon.socket) as client:
            outputs, params = await client.infer(name, {"input": x}, {"input": "FP32"})
        np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-4, atol=1e-5)
        assert params["batch_size"] >= 3
    status, _, body = await call(daemon, "POST", "/v2/repository/index", body={})
    states = {row["name"]: row["state"] for row in json.loads(body)}
    assert states["demo-mlp"] == "READY" and states["demo-lm"] == "UNAVAILABLE"
    for name in ("demo-mlp", "demo-mlp-ds"):
        assert (await call(daemon, "POST", f"/v2/repository/models/{name}/unload"))[0] == 200
        assert (await call(daemon, "GET", f"/v2/models/{name}"))[0] == 404


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        ({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}, "inputs[0].name"),
        ({"inputs": [{"name": "input", "datatype": "INT32", "shape": [1, 64], "data": [0] * 64}]}, "inputs[0].datatype"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 63], "data": [0.0] * 63}]}, "inputs[0].shape"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 60}]}, "inputs[0].data"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [100, 64], "data": [0.0] * 6400}]}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}], "outputs": [{"name": "x"}]}, "outputs[0].name"),
    ],
)
async def test_bad_infer_input_is_400_naming_the_field(daemon: DaemonProc, request_body: dict, field: str) -> None:
    await call(daemon, "POST", "/v2/repository/models/demo-mlp/load", body={"parameters": {"max_batch_size": 32}})
    before = json.loads((await call(daemon, "GET", "/lm/v1/models/demo-mlp"))[2])
    status, _, body = await call(daemon, "POST", "/v2/models/demo-mlp/infer", body=request_body)
    assert status == 400, body
    assert json.loads(body)["field"] == field
    after = json.loads((await call(daemon, "GET", "/lm/v1/models/demo-mlp"))[2])
    assert after["batcher"]["batches"] == before["batcher"]["batches"], "a bad request never reaches the runner"


async def test_malformed_and_oversized_bodies(daemon: DaemonProc) -> None:
    await call(daemon, "POST", "/v2/repository/models/demo-mlp/load", body={})
    status, _, body = await call(daemon, "POST", "/v2/models/demo-mlp/infer", data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = await call(daemon, "POST", "/v2/models/demo-mlp/infer", data=b"x" * (65 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert status == 413 and "too large" in json.loads(body)["error"]


async def test_bad_load_requests_change_nothing(daemon: DaemonProc) -> None:
    before = json.loads((await call(daemon, "GET", "/lm/v1/models"))[2])["loaded"]
    for name, params, code, words in [
        ("nope", {}, 404, "not found"),
        ("a..b", {}, 400, "invalid model name"),
        (".hidden", {}, 400, "invalid model name"),
        ("demo-mlp", {"dtype": "int3"}, 400, "dtype"),
        ("demo-mlp", {"batch": 3}, 400, "unknown setting"),
        ("demo-mlp", {"backend": "deepspeed"}, 422, "onnx"),
    ]:
        status, _, body = await call(daemon, "POST", f"/v2/repository/models/{name}/load", body={"parameters": params})
        assert status == code, (name, params, body)
        assert words in json.loads(body)["error"].lower()
    after = json.loads((await call(daemon, "GET", "/lm/v1/models"))[2])["loaded"]
    assert [m["name"] for m in after] == [m["name"] for m in before]


async def test_tune_live_and_validation(daemon: DaemonProc) -> None:
    await call(daemon, "POST", "/v2/repository/models/demo-mlp/load", body={})
    status, _, body = await call(daemon, "PATCH", "/lm/v1/models/demo-mlp", body={"settings": {"max_batch_size": 5, "max_delay_ms": 1.5}})
    assert status == 200 and json.loads(body)["settings"]["max_batch_size"] == 5
    status, _, body = await call(daemon, "PATCH", "/lm/v1/models/demo-mlp", body={"settings": {"max_batch_size": -1}})
    assert status == 400 and json.loads(body)["field"] == "parameters.max_batch_size"
    model = json.loads((await call(daemon, "GET", "/lm/v1/models/demo-mlp"))[2])
    assert model["settings"]["max_batch_size"] == 5


async def test_events_config_metrics(daemon: DaemonProc) -> None:
    status, _, body = await call(daemon, "GET", "/lm/v1/events?since=0&limit=10")
    assert status == 200 and len(json.loads(body)["events"]) <= 10
    assert (await call(daemon, "GET", "/lm/v1/events?since=x"))[0] == 400
    status, _, body = await call(daemon, "GET", "/lm/v1/config")
    config = json.loads(body)
    assert config["values"]["server"]["socket"] == str(daemon.socket)
    assert config["sources"]["server.socket"].startswith("file ")
    status, headers, body = await call(daemon, "GET", "/metrics")
    assert status == 200 and b"lastmile_up 1.0" in body


async def test_client_raises_api_error_with_field(daemon: DaemonProc) -> None:
    async with LastmileClient(daemon.socket) as client:
        with pytest.raises(ApiError) as info:
            await client.load("demo-mlp", {"max_queue": 0})
    assert info.value.status == 400 and info.value.field == "parameters.max_queue"


async def test_folder_with_only_an_artifact_loads(store_copy: Path, tmp_path: Path) -> None:
    """No model.toml: the ONNX signature is read from the artifact and the model serves."""
    from tests.conftest import start_daemon

    bare = store_copy / "bare-onnx"
    bare.mkdir()
    (bare / "classifier.onnx").write_bytes((store_copy / "demo-mlp" / "model.onnx").read_bytes())
    d = start_daemon(tmp_path / "d", store_copy)
    try:
        deadline = asyncio.get_running_loop().time() + 60.0
        while True:  # the signature is read in the background; until then the entry says so
            entry = next(e for e in json.loads((await call(d, "GET", "/lm/v1/models"))[2])["store"] if e["name"] == "bare-onnx")
            if entry["format"] is not None or asyncio.get_running_loop().time() > deadline:
                break
            assert "in the background" in (entry["error"] or ""), entry
            await asyncio.sleep(0.2)
        assert entry["format"] == "onnx" and entry["error"] is None
        assert entry["inputs"][0]["name"] == "input"
        status, _, body = await call(d, "POST", "/v2/repository/models/bare-onnx/load", body={})
        assert status == 200, body
        async with LastmileClient(d.socket) as client:
            outputs, _ = await client.infer("bare-onnx", {"input": example_inputs("mlp", 2)["input"]}, {"input": "FP32"})
        assert outputs[entry["outputs"][0]["name"]].shape == (2, 10)
    finally:
        d.stop()


async def test_data_plane_decides_model_version_and_order(daemon: DaemonProc) -> None:
    """Which model a name and version mean is decided before the body is read: an unknown
    model is 404 whatever it sent; a stored but unloaded one says how to load it; only
    version 1 is served."""
    status, _, body = await call(daemon, "POST", "/v2/models/nope/infer", data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = await call(daemon, "GET", "/v2/models/demo-lm")
    assert status == 404 and "POST /v2/repository/models/demo-lm/load" in json.loads(body)["error"]
    await call(daemon, "POST", "/v2/repository/models/demo-mlp/load", body={})
    status, _, body = await call(daemon, "GET", "/v2/models/demo-mlp/versions/2")
    assert status == 404 and "only version 1" in json.loads(body)["error"]
    assert (await call(daemon, "GET", "/v2/models/demo-mlp/versions/1/ready"))[0] == 200
    status, _, body = await call(daemon, "POST", "/v2/repository/index", body={"ready": True})
    assert status == 200 and [r["name"] for r in json.loads(body)] == ["demo-mlp"]


async def test_settings_patch_is_live_or_a_reload_as_the_vocabulary_says(daemon: DaemonProc) -> None:
    """A live key keeps the runner process; any other key starts new runners with it."""
    from lastmile.models.vocabulary import LIVE_KEYS

    await call(daemon, "POST", "/v2/repository/models/demo-mlp/load", body={})
    before = json.loads((await call(daemon, "GET", "/lm/v1/models/demo-mlp"))[2])
    pids = [r["pid"] for r in before["runners"]]
    assert "max_queue" in LIVE_KEYS
    status, _, body = await call(daemon, "PATCH", "/lm/v1/models/demo-mlp", body={"settings": {"max_queue": 77}})
    live = json.loads(body)
    assert status == 200 and live["settings"]["max_queue"] == 77 and [r["pid"] for r in live["runners"]] == pids
    assert live["batcher"]["max_queue"] == 77  # the batcher took it at once
    fusion = "off" if before["settings"]["graph_fusion"] != "off" else "basic"
    assert "graph_fusion" not in LIVE_KEYS
    status, _, body = await call(daemon, "PATCH", "/lm/v1/models/demo-mlp", body={"settings": {"graph_fusion": fusion}})
    reloaded = json.loads(body)
    assert status == 200 and reloaded["settings"]["graph_fusion"] == fusion
    assert reloaded["settings"]["max_queue"] == 77  # the earlier live change rides along
    assert not set(r["pid"] for r in reloaded["runners"]) & set(pids)
