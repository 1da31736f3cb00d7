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


def _live(request: web.Request, rows: list[dict]) -> list[dict]:
    """Generation rows get the figures the generation routes observe (tokens/s over the last
    seconds, TTFT and inter-token p50/p99, streams): ``GenerationMetrics.live_fields``."""
    from lastmile.appliance.server.routes_generate import GENERATION_METRICS

    metrics = request.app.get(GENERATION_METRICS)
    return metrics.annotate_rows(rows) if metrics is not None else rows


@routes.get("/lm/v1/models")
async def models(request: web.Request) -> web.Response:
    data = dataplane_of(request).models()
    _live(request, data["loaded"])
    return web.json_response(data)


@routes.get("/lm/v1/models/{name}")
async def model(request: web.Request) -> web.Response:
    return web.json_response(_live(request, [dataplane_of(request).describe(request.match_info["name"])])[0])


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
