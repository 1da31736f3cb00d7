"""The naive server: what one writes first. Same HTTP stack (aiohttp) and the same V2 codec as
Lastmile, the backend in the server process, and one request = one forward call: no batching,
no runner process, no queue. Only for the benchmark.

``python -m bench.naive --store DIR --model NAME (--socket PATH | --port N) [--settings JSON]``
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web

from lastmile.appliance.v2codec import HEADER_LENGTH, BadRequest, decode_request, encode_response, split_body
from bench.common import load_backend, serve_app


def build_app(store: str, model: str, settings: dict) -> web.Application:
    from lastmile.models.store import ModelStore

    manifest = ModelStore(store).get(model)
    backend = load_backend(store, model, settings)
    out_names = [t.name for t in manifest.outputs]
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
            decoded = decode_request(header, binary, manifest.inputs, out_names)
        except BadRequest as exc:
            return web.json_response({"error": str(exc), "field": exc.field}, status=400)
        started = time.perf_counter()
        outputs = backend.run(decoded.inputs)  # on the event loop: one forward per request
        extra = {"batch_size": next(iter(decoded.inputs.values())).shape[0],
                 "compute_ms": round((time.perf_counter() - started) * 1000, 3)}
        payload, headers = encode_response(model, decoded, outputs, manifest.outputs, extra)
        return web.Response(body=payload, headers=headers)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--socket")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve_app(build_app(args.store, args.model, json.loads(args.settings)), args.socket, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
