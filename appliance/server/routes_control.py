"""Lastmile's own ``/lm/v1`` API: host facts, status, models with their live figures, settings
changes, events and the effective config. Each route decodes, asks the data plane, encodes."""

from __future__ import annotations

from aiohttp import web

from lastmile.appliance.server.auth import requires_role
from lastmile.appliance.server.dataplane import dataplane_of
from lastmile.appliance.server.http import ApiError, read_json

routes = web.RouteTableDef()

EVENTS_LIMIT_MAX = 2000


@routes.get("/lm/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(dataplane_of(request).status())


@routes.get("/lm/v1/system")
async def system(request: web.Request) -> web.Response:
    return web.json_response(await dataplane_of(request).system())


@routes.get("/lm/v1/models")
async def models(request: web.Request) -> web.Response:
    return web.json_response(dataplane_of(request).models())


@routes.get("/lm/v1/models/{name}")
async def model(request: web.Request) -> web.Response:
    return web.json_response(dataplane_of(request).describe(request.match_info["name"]))


@routes.patch("/lm/v1/models/{name}")
async def tune(request: web.Request) -> web.Response:
    """Batching knobs change live; any other setting reloads the model with it."""
    body = await read_json(request)
    changes = body.get("settings")
    if not isinstance(changes, dict) or not changes:
        raise ApiError(400, "'settings' must be a non-empty object, e.g. {\"settings\": {\"max_batch_size\": 16}}", field="settings")
    return web.json_response(await dataplane_of(request).change_settings(request.match_info["name"], changes))


@routes.get("/lm/v1/events")
async def events(request: web.Request) -> web.Response:
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "500"))
    except ValueError:
        raise ApiError(400, "'since' and 'limit' must be integers", field="since") from None
    if limit < 1 or limit > EVENTS_LIMIT_MAX:
        raise ApiError(400, f"'limit' must be from 1 to {EVENTS_LIMIT_MAX}", field="limit")
    return web.json_response({"events": dataplane_of(request).events(since, limit)})


@routes.get("/lm/v1/config")
@requires_role("operator")
async def config(request: web.Request) -> web.Response:
    return web.json_response(dataplane_of(request).config())
