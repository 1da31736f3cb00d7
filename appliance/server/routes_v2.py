"""KServe Open Inference Protocol V2: health, server and model metadata, readiness, infer;
and Triton's model repository extension (index, load, unload).

Each route decodes the request, asks the data plane (:mod:`.dataplane`) and encodes its
answer; the decisions are the data plane's.
"""

from __future__ import annotations

import time

from aiohttp import web

from lastmile.appliance.server.daemon import Daemon
from lastmile.appliance.server.dataplane import EXTENSIONS, InferResult, dataplane_of
from lastmile.appliance.server.http import ApiError, read_json, to_api_error
from lastmile.appliance.v2codec import HEADER_LENGTH, encode_response, split_body

__all__ = ["EXTENSIONS", "daemon_of", "routes"]

routes = web.RouteTableDef()


def daemon_of(request: web.Request) -> Daemon:
    """The daemon behind the app (for the route modules that need more than the data plane)."""
    return request.app["daemon"]


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(dataplane_of(request).server_metadata())


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    # The protocol: status code is the answer, the body should be empty.
    return web.Response(status=200)


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if dataplane_of(request).server_ready() else 400)


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def metadata(request: web.Request) -> web.Response:
    return web.json_response(dataplane_of(request).model_metadata(request.match_info["name"], _version(request)))


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if dataplane_of(request).model_ready(request.match_info["name"], _version(request)) else 400)


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    """Decode, infer, encode; every request is counted and timed in ``/metrics`` (success and
    each kind of failure, under the label the data plane picks for the name)."""
    plane = dataplane_of(request)
    metrics = request.app.get("infer_metrics")
    name = request.match_info["name"]
    started = time.perf_counter()
    try:
        model = plane.model(name, _version(request))  # before the body: an unknown model is 404 whatever it sent
        header, binary = split_body(await request.read(), request.headers.get(HEADER_LENGTH))
        result = await plane.infer(model, header, binary)
        response = _encode(result, started, request.app["config"].server["max_response_mb"] * 1024 * 1024)
    except Exception as exc:
        if metrics is not None:
            mapped = to_api_error(exc)
            metrics.failure(plane.metric_label(name), mapped.status if mapped is not None else 500, time.perf_counter() - started)
        raise
    if metrics is not None:
        metrics.success(result.model, time.perf_counter() - started, result.batch)
    return response


def _encode(result: InferResult, started: float, max_bytes: int) -> web.Response:
    """The V2 response, with the batch it rode in and the daemon's timings as parameters;
    one that could exceed ``max_bytes`` (server.max_response_mb) is refused before it is built."""
    batch = result.batch
    extra = {
        "batch_id": batch.batch_id,
        "batch_size": batch.batch_size,
        "queue_ms": round(batch.queue_s * 1000, 3),
        "compute_ms": round(batch.compute_s * 1000, 3),
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    payload, headers = encode_response(result.model, result.request, result.outputs, result.output_specs, extra, max_bytes=max_bytes)
    return web.Response(body=payload, headers=headers)


# --- Triton's model repository extension -------------------------------------------------------


@routes.post("/v2/repository/index")
async def repository_index(request: web.Request) -> web.Response:
    body = await read_json(request, required=False)
    only_ready = body.get("ready", False)
    if not isinstance(only_ready, bool):
        raise ApiError(400, "'ready' must be true or false", field="ready")
    return web.json_response(dataplane_of(request).repository_index(only_ready))


async def _repository_parameters(request: web.Request, verb: str) -> dict:
    """The ``parameters`` object of a repository load/unload body: the body's only key.

    A misspelt "parameters" must not load (or unload) with no settings at all, so any other key
    is a 400 naming it."""
    body = await read_json(request, required=False)
    unknown = sorted(set(body) - {"parameters"})
    if unknown:
        raise ApiError(400, f"unknown key {unknown[0]!r} in the {verb} body; known: parameters", field=unknown[0])
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, "'parameters' must be an object of settings", field="parameters")
    return parameters


@routes.post("/v2/repository/models/{name}/load")
async def repository_load(request: web.Request) -> web.Response:
    parameters = await _repository_parameters(request, "load")
    return web.json_response(await dataplane_of(request).load(request.match_info["name"], parameters))


@routes.post("/v2/repository/models/{name}/unload")
async def repository_unload(request: web.Request) -> web.Response:
    parameters = await _repository_parameters(request, "unload")
    drain = parameters.get("drain", False)
    if not isinstance(drain, bool):
        raise ApiError(400, "'parameters.drain' must be true or false", field="parameters.drain")
    await dataplane_of(request).unload(request.match_info["name"], drain=drain)
    return web.json_response({})
