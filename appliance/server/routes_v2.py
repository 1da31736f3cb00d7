"""KServe Open Inference Protocol V2: health, server and model metadata, readiness, infer;
and Triton's model repository extension (index, load, unload)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from lastmile.appliance.server.daemon import Daemon
from lastmile.appliance.server.http import ApiError, read_json, to_api_error
from lastmile.appliance.server.textio import is_text_model, public_specs, v2_text_infer
from lastmile.appliance.v2codec import HEADER_LENGTH, decode_request, encode_response, split_body
from lastmile.runtime.manager import LoadedModel

routes = web.RouteTableDef()
EXTENSIONS = ["model_repository", "binary_tensor_data", "lastmile_v1"]


def daemon_of(request: web.Request) -> Daemon:
    return request.app["daemon"]


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "lastmile", "version": daemon_of(request).version, "extensions": EXTENSIONS})


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    # The protocol: status code is the answer, the body should be empty.
    return web.Response(status=200)


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if daemon_of(request).ready else 400)


def _loaded(request: web.Request) -> LoadedModel:
    daemon = daemon_of(request)
    name = request.match_info["name"]
    version = request.match_info.get("version")
    if version is not None and version != "1":
        raise ApiError(404, f"model {name!r} has no version {version!r} (only version 1 is served)")
    model = daemon.manager.models.get(name)
    if model is None:
        hint = " (it is in the store: load it with POST /v2/repository/models/%s/load)" % name if name in daemon.store.names() else ""
        raise ApiError(404, f"model {name!r} is not loaded{hint}")
    return model


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    inputs, outputs = public_specs(model.manifest)  # a text model shows its derived text tensors
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": f"{model.backend}_{model.manifest.format}",
        "inputs": [t.as_v2() for t in inputs],
        "outputs": [t.as_v2() for t in outputs],
    }


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def metadata(request: web.Request) -> web.Response:
    return web.json_response(model_metadata(_loaded(request)))


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if _loaded(request).state == "ready" else 400)


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    """Decode, batch, encode; every request is counted and timed in ``/metrics`` (success and
    each kind of failure, labelled with the model only when it is loaded or in the store, so
    a client cannot grow the label set with made-up names)."""
    metrics = request.app.get("infer_metrics")
    started = time.perf_counter()
    try:
        response = await _infer(request, started)
    except Exception as exc:
        if metrics is not None:
            mapped = to_api_error(exc)
            name = request.match_info["name"]
            daemon = daemon_of(request)
            label = name if name in daemon.manager.models or name in daemon.store.names() else "_unknown"
            metrics.failure(label, mapped.status if mapped is not None else 500, time.perf_counter() - started)
        raise
    if metrics is not None:
        metrics.success(response[1], time.perf_counter() - started, response[2])
    return response[0]


async def _infer(request: web.Request, started: float) -> tuple[web.Response, str, Any]:
    model = _loaded(request)
    if is_text_model(model.manifest):  # text in: lastmile.appliance.server.textio
        return await v2_text_infer(request, daemon_of(request), model, started)
    if not model.manifest.inputs or not model.manifest.outputs:
        raise ApiError(422, f"model {model.name!r} has no input/output spec: {' '.join(model.manifest.missing)}")
    body = await request.read()
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    decoded = decode_request(header, binary, model.manifest.inputs, [t.name for t in model.manifest.outputs])
    outputs, batch = await daemon_of(request).manager.infer(model.name, decoded.inputs)
    extra = {
        "batch_id": batch.batch_id,
        "batch_size": batch.batch_size,
        "queue_ms": round(batch.queue_s * 1000, 3),
        "compute_ms": round(batch.compute_s * 1000, 3),
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    payload, headers = encode_response(model.name, decoded, outputs, model.manifest.outputs, extra)
    return web.Response(body=payload, headers=headers), model.name, batch


# --- Triton's model repository extension -------------------------------------------------------


@routes.post("/v2/repository/index")
async def repository_index(request: web.Request) -> web.Response:
    body = await read_json(request, required=False)
    only_ready = body.get("ready", False)
    if not isinstance(only_ready, bool):
        raise ApiError(400, "'ready' must be true or false", field="ready")
    daemon = daemon_of(request)
    rows = []
    for entry in daemon.store.entries():
        model = daemon.manager.models.get(entry.name)
        state = {"ready": "READY", "loading": "LOADING", "unloading": "UNLOADING"}.get(model.state, "UNAVAILABLE") if model else "UNAVAILABLE"
        if only_ready and state != "READY":
            continue
        reason = entry.error or (model.error if model and model.error else "")
        rows.append({"name": entry.name, "version": "1", "state": state, "reason": reason or ""})
    return web.json_response(rows)


@routes.post("/v2/repository/models/{name}/load")
async def repository_load(request: web.Request) -> web.Response:
    body = await read_json(request, required=False)
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, "'parameters' must be an object of settings", field="parameters")
    model = await daemon_of(request).manager.load(request.match_info["name"], parameters)
    return web.json_response(model.describe())


@routes.post("/v2/repository/models/{name}/unload")
async def repository_unload(request: web.Request) -> web.Response:
    await read_json(request, required=False)
    daemon, name = daemon_of(request), request.match_info["name"]
    if name not in daemon.manager.models and name in daemon.unrestored:
        del daemon.unrestored[name]  # a model that failed to restore: forget it
        daemon.save_state()
        return web.json_response({})
    await daemon.manager.unload(name)
    return web.json_response({})
