"""Lastmile's own ``/lm/v1`` API: host facts, status, models with their live figures, settings
changes, events and the effective config."""

from __future__ import annotations

from aiohttp import web

from lastmile.appliance.server.auth import requires_role
from lastmile.appliance.server.http import ApiError, read_json
from lastmile.appliance.server.routes_v2 import daemon_of
from lastmile.appliance.server.textio import public_specs
from lastmile.runtime.manager import BATCHER_KEYS

routes = web.RouteTableDef()


@routes.get("/lm/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(daemon_of(request).summary())


@routes.get("/lm/v1/system")
async def system(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    return web.json_response({**(await daemon.system_facts()), "daemon": daemon.summary()})


@routes.get("/lm/v1/models")
async def models(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    store = []
    for entry in daemon.store.entries():
        manifest = entry.manifest
        inputs, outputs = public_specs(manifest) if manifest else ((), ())
        store.append(
            {
                "name": entry.name,
                "loaded": entry.name in daemon.manager.models,
                "format": manifest.format if manifest else None,
                "backend": manifest.backend if manifest else None,
                "description": manifest.description if manifest else "",
                "inputs": [t.as_v2() for t in inputs],
                "outputs": [t.as_v2() for t in outputs],
                # a Hugging Face folder: what was derived, from which file (lastmile.models.hf)
                "text": manifest.hf.as_dict() if manifest and manifest.hf is not None else None,
                "settings": manifest.settings if manifest else {},
                "missing": list(manifest.missing) if manifest else [],
                "error": entry.error,
            }
        )
    loaded = [m.describe() for m in daemon.manager.models.values()]
    return web.json_response({"loaded": loaded, "store": store})


@routes.get("/lm/v1/models/{name}")
async def model(request: web.Request) -> web.Response:
    return web.json_response(daemon_of(request).manager.get(request.match_info["name"]).describe())


@routes.patch("/lm/v1/models/{name}")
async def tune(request: web.Request) -> web.Response:
    """Batching knobs change live; any other setting reloads the model with it."""
    daemon = daemon_of(request)
    name = request.match_info["name"]
    body = await read_json(request)
    changes = body.get("settings")
    if not isinstance(changes, dict) or not changes:
        raise ApiError(400, "'settings' must be a non-empty object, e.g. {\"settings\": {\"max_batch_size\": 16}}", field="settings")
    model = daemon.manager.get(name)
    model.settings.overlay(changes)  # validate everything before changing anything
    if set(changes) <= set(BATCHER_KEYS):
        model = daemon.manager.configure(name, changes)
    else:
        model = await daemon.manager.load(name, {**model.overrides, **changes})
    return web.json_response(model.describe())


@routes.get("/lm/v1/events")
async def events(request: web.Request) -> web.Response:
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "500"))
    except ValueError:
        raise ApiError(400, "'since' and 'limit' must be integers", field="since") from None
    if limit < 1 or limit > 2000:
        raise ApiError(400, "'limit' must be from 1 to 2000", field="limit")
    return web.json_response({"events": daemon_of(request).events.since(since, limit)})


@routes.get("/lm/v1/config")
@requires_role("operator")
async def config(request: web.Request) -> web.Response:
    cfg = daemon_of(request).config
    return web.json_response({"file": str(cfg.file) if cfg.file else None, "values": cfg.as_dict(), "sources": cfg.sources})
