"""``/lm/v1/memory``: budgets per device and per model with live usage (GET), budgets and memory
policy changed at run time (PUT), and the estimate of a load before it is made (POST
``/lm/v1/memory/estimate``, what ``lastmile load --dry-run`` shows)."""

from __future__ import annotations

from aiohttp import web

from lastmile.appliance.server.config import SCHEMA
from lastmile.appliance.server.http import ApiError, read_json
from lastmile.appliance.server.routes_v2 import daemon_of
from lastmile.models.settings import SettingError

routes = web.RouteTableDef()


@routes.get("/lm/v1/memory")
async def memory(request: web.Request) -> web.Response:
    return web.json_response(daemon_of(request).manager.governor.snapshot())


@routes.put("/lm/v1/memory")
async def set_memory(request: web.Request) -> web.Response:
    """Any subset of the ``[memory]`` keys; every value is checked (and the watermarks
    against each other) before anything changes. Not written back to the config file."""
    body = await read_json(request)
    if not body:
        raise ApiError(400, f"body must set at least one of: {', '.join(SCHEMA['memory'])}")
    clean = {}
    for key, value in body.items():
        check = SCHEMA["memory"].get(key)
        if check is None:
            raise ApiError(400, f"{key}: unknown memory setting; known: {', '.join(SCHEMA['memory'])}", field=key)
        try:
            clean[key] = check(key, value)
        except SettingError as exc:
            raise ApiError(400, str(exc), field=key) from None
    governor = daemon_of(request).manager.governor
    try:
        governor.configure(clean)
    except ValueError as exc:
        raise ApiError(400, str(exc), field=str(exc).split(":", 1)[0]) from None
    return web.json_response(governor.snapshot())


@routes.post("/lm/v1/memory/estimate")
async def estimate(request: web.Request) -> web.Response:
    """``{"model": name, "parameters": {...settings}}`` -> the estimate per part and device,
    whether it fits now, and when not the shortfall and the options that would fit."""
    body = await read_json(request)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' must be the name of a model in the store", field="model")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, "'parameters' must be an object of settings", field="parameters")
    return web.json_response(daemon_of(request).manager.estimate(name, parameters))
