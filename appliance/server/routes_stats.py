"""Triton's statistics extension: ``GET /v2/models/stats`` (every loaded model) and
``GET /v2/models/{name}[/versions/{version}]/stats``, in Triton's JSON shape so tools built for
Triton (``tritonclient``'s ``get_inference_statistics``, dashboards) read it unchanged.

The counters live on each loaded model (:mod:`lastmile.runtime.inference_stats`); they start
at zero when a model is loaded (a reload is a new model). Registered before the V2 routes:
``/v2/models/stats`` would otherwise be read as the metadata of a model named ``stats``.
"""

from __future__ import annotations

from aiohttp import web

from lastmile.appliance.server.dataplane import dataplane_of
from lastmile.appliance.server.routes_v2 import daemon_of

routes = web.RouteTableDef()


@routes.get("/v2/models/stats")
async def all_stats(request: web.Request) -> web.Response:
    models = daemon_of(request).manager.models
    return web.json_response({"model_stats": [m.counters.triton(name) for name, m in sorted(models.items())]})


@routes.get("/v2/models/{name}/stats")
@routes.get("/v2/models/{name}/versions/{version}/stats")
async def model_stats(request: web.Request) -> web.Response:
    model = dataplane_of(request).model(request.match_info["name"], request.match_info.get("version"))
    return web.json_response({"model_stats": [model.counters.triton(model.name)]})
