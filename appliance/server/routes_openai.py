"""The OpenAI-compatible API's model list and embeddings: ``GET /v1/models``,
``GET /v1/models/{model}`` and ``POST /v1/embeddings``.

OpenAI's clients hard-code these paths and shapes, so an unmodified ``openai`` client (or
LangChain's ``OpenAIEmbeddings``) works against Lastmile: over TCP the bearer token is the
``api_key``; over the Unix socket give the client an ``httpx`` transport with ``uds=``.
Errors on ``/v1`` paths use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, because those clients read it; the status codes are Lastmile's usual ones.

``/v1/embeddings`` takes ``input`` as a string, a list of strings, a list of token ids or a
list of such lists; ``encoding_format`` ``float`` (default) or ``base64`` (little-endian
float32, what the ``openai`` package asks for by default); ``dimensions`` only when it equals
the model's; and one extension, ``truncate`` (bool): cut texts longer than the model's max
length instead of answering 400 with their token count.
"""

from __future__ import annotations

import base64
import functools
from typing import Any, Awaitable, Callable

from aiohttp import web

from lastmile.appliance.server.auth import requires_role
from lastmile.appliance.server.http import ApiError, openai_error_payload, read_json, to_api_error
from lastmile.appliance.server.textio import MAX_INPUTS, TextBatch, ids_to_wire, is_text_model, run_text, texts_to_wire
from lastmile.appliance.v2codec import BadRequest

routes = web.RouteTableDef()
OWNED_BY = "lastmile"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def openai_error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error body (:func:`~lastmile.appliance.server.http.openai_error_payload`) as a response."""
    return web.json_response(openai_error_payload(status, message, param=param), status=status, headers=headers)


def openai_errors(handler: Handler) -> Handler:
    """Every failure of ``handler`` as OpenAI's error JSON (the daemon's mapping gives the status)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # e.g. 413 from reading a body past server.max_body_mb
            if exc.status < 400:
                raise
            if exc.status == 413:
                limit = request.app["config"].server["max_body_mb"]
                return openai_error(413, f"request body too large (limit {limit} MB)")
            return openai_error(exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - mapped like the error middleware does
            api = to_api_error(exc)
            if api is None:
                raise
            return openai_error(api.status, api.message, api.field, api.headers)

    return wrapped


def _daemon(request: web.Request) -> Any:
    return request.app["daemon"]


def _model_row(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": OWNED_BY}


@routes.get("/v1/models")
@openai_errors
async def list_models(request: web.Request) -> web.Response:
    """The loaded models (what a client can call now), in OpenAI's list format."""
    models = _daemon(request).manager.models
    data = [_model_row(m.name, m.loaded_at) for m in models.values() if m.state == "ready"]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model}")
@openai_errors
async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    model = _daemon(request).manager.models.get(name)
    if model is None or model.state != "ready":
        raise ApiError(404, f"model {name!r} is not loaded", field="model")
    return web.json_response(_model_row(model.name, model.loaded_at))


def _inputs(value: Any) -> tuple[str, list[Any]]:
    """``("text", [str...])`` or ``("ids", [[int...]...])`` from OpenAI's ``input`` forms."""
    if isinstance(value, str):
        return "text", [value]
    if not isinstance(value, list):
        raise BadRequest(f"input must be a string, a list of strings or a list of token-id lists, got {type(value).__name__}", "input")
    if not value:
        raise BadRequest("input is an empty list", "input")
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"input has {len(value)} items; at most {MAX_INPUTS}", "input")
    if all(isinstance(v, str) for v in value):
        return "text", value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "ids", [value]
    if all(isinstance(v, list) for v in value):
        return "ids", value
    bad = next(i for i, v in enumerate(value) if not isinstance(v, (str, list)) or isinstance(v, bool))
    raise BadRequest(f"input[{bad}] is a {type(value[bad]).__name__}; items must all be strings or all token-id lists",
                     f"input[{bad}]" if not isinstance(value[bad], (str, list)) else "input")


@routes.post("/v1/embeddings")
@requires_role("viewer")  # inference changes nothing: viewers may call it, like V2 infer
@openai_errors
async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("model must be the name of a loaded model", "model")
    daemon = _daemon(request)
    model = daemon.manager.models.get(name)
    if model is None:
        raise ApiError(404, f"model {name!r} is not loaded (GET /v1/models lists those that are)", field="model")
    manifest = model.manifest
    if not is_text_model(manifest) or manifest.hf.task != "feature-extraction":
        task = manifest.hf.task if manifest.hf is not None else f"a {manifest.format} tensor model"
        raise BadRequest(f"model {name!r} does not make embeddings (it is {task}); use an embedding model", "model")
    hf = manifest.hf
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise BadRequest(f"truncate must be true or false, got {truncate!r}", "truncate")
    dims = body.get("dimensions")
    if dims is not None and dims != hf.embedding_dim:
        raise BadRequest(f"dimensions {dims!r}: this model makes {hf.embedding_dim}-dimensional embeddings only", "dimensions")
    kind, items = _inputs(body.get("input"))
    fields = [f"input[{i}]" for i in range(len(items))] if isinstance(body.get("input"), list) else ["input"]
    if kind == "ids" and len(fields) != len(items):
        fields = ["input"]
    hint = "truncate = true"
    batch: TextBatch
    if kind == "text":
        if hf.tokenizer is None:
            raise BadRequest(f"model {name!r} has no tokenizer.json: send token-id lists instead of text", "input")
        raws = []
        for i, text in enumerate(items):
            try:
                raws.append(text.encode("utf-8"))
            except UnicodeEncodeError as exc:  # a lone surrogate escape in the JSON
                raise BadRequest(f"text is not valid Unicode: {exc.reason}", fields[i]) from None
        batch = texts_to_wire(raws, hf, fields, truncate, hint)
    else:
        batch = ids_to_wire(items, None, hf, fields, truncate, hint)
    outputs, _ = await run_text(daemon.manager, name, hf, batch, model.settings.max_batch_size, hint)
    vectors = outputs["embeddings"]
    data = []
    for i, row in enumerate(vectors):
        value: Any = base64.b64encode(row.astype("<f4").tobytes()).decode() if fmt == "base64" else row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = int(outputs["token_count"].sum())
    return web.json_response({"object": "list", "data": data, "model": name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
