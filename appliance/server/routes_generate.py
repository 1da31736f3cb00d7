"""Text generation over HTTP: OpenAI's ``/v1/chat/completions`` and ``/v1/completions``,
Triton's generate extension (``/v2/models/{name}/generate`` and ``/generate_stream``), and
Ollama's ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/ps`` (NDJSON), so tools built
for Ollama work too.

Every API runs through one driver (:func:`_serve`), which owns the three things that make a
stream trustworthy:

- **Errors before headers.** ``ModelManager.generate`` raises every refusal (not loaded, not a
  generation model, context overflow, queue full) before its first chunk, so the driver waits
  for that chunk before it sends a status line: a refused request gets its real 4xx/5xx, never
  a 200 followed by an error event.
- **Backpressure and cancellation.** Each event is written and awaited before the next chunk
  is pulled from the runner, so a slow reader slows its own sequence rather than growing a
  buffer in the daemon. A client that goes away (write fails, or aiohttp cancels the handler)
  closes the generator at once, which cancels the sequence in the runner and frees its slot
  and KV cache.
- **A runner that dies mid-stream** turns into one error event and the end of the stream
  (``data: [DONE]`` for OpenAI), never a hang.

The wire formats differ only in how a chunk, an error and the end are written (one small
class each below). Bodies are parsed by :mod:`generate_params`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import orjson
from aiohttp import web

from lastmile.appliance.server.generate_params import (
    ParamError, ParsedRequest, parse_chat, parse_completion, parse_ollama_chat, parse_ollama_generate, parse_triton,
)
from lastmile.appliance.server.generation_metrics import GenerationMetrics
from lastmile.appliance.server.http import ApiError, read_json, to_api_error
from lastmile.runtime.errors import RunnerDied
from lastmile.runtime.generation.types import ContextOverflow, GenerationChunk, InvalidGenerationTarget, InvalidSamplingParams

logger = logging.getLogger("lastmile.generate")

routes = web.RouteTableDef()
GENERATION_METRICS = web.AppKey("generation_metrics", GenerationMetrics)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def setup_generation(app: web.Application) -> None:
    """Register the generation routes and their metrics (after ``setup_metrics``, whose
    Prometheus registry they join)."""
    app[GENERATION_METRICS] = GenerationMetrics(app.get("metrics_registry"), app["daemon"])
    app.add_routes(routes)


# --- errors ------------------------------------------------------------------------------


def generation_api_error(exc: BaseException) -> ApiError | None:
    """The HTTP meaning of a generation failure; the table of ``http.to_api_error`` for the rest."""
    match exc:
        case ParamError():
            return ApiError(400, exc.message, field=exc.field)
        case ContextOverflow():
            return ApiError(400, str(exc), field=exc.field, extra={
                "prompt_tokens": exc.prompt_tokens, "max_tokens": exc.max_tokens, "max_context": exc.max_context})
        case InvalidGenerationTarget():
            return ApiError(400, str(exc), field="model")
        case InvalidSamplingParams():
            return ApiError(400, str(exc), field=exc.field or None)
    return to_api_error(exc)


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "server_error", 504: "timeout_error", 507: "insufficient_memory_error"}


def openai_error_body(api: ApiError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` (plus the counts of
    a context overflow, so a client can shorten by the right amount)."""
    code = None
    if api.status == 404:
        code = "model_not_found"
    elif api.extra.get("max_context") is not None:
        code = "context_length_exceeded"
    elif api.status == 503:
        code = "overloaded"
    extra = {k: v for k, v in api.extra.items() if k != "error"}
    return {"error": {"message": api.message, "type": _OPENAI_TYPES.get(api.status, "server_error"),
                      "param": api.field, "code": code, **extra}}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def _mapped(exc: BaseException) -> ApiError:
    api = generation_api_error(exc)
    if api is None:
        logger.exception("generation failed", exc_info=exc)
        api = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
    return api


def _outcome(status: int) -> str:
    return "success" if status < 400 else "bad_request" if status < 500 and status != 404 else \
        "not_found" if status == 404 else "unavailable" if status in (503, 507) else "error"


# --- wire formats --------------------------------------------------------------------------


class _Format:
    """How one API writes a stream. ``events`` are bytes ready for the socket."""

    api = ""
    content_type = "text/event-stream"

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        self.parsed, self.model = parsed, model
        self.created = int(time.time())

    @staticmethod
    def sse(obj: Any) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def start(self) -> list[bytes]:
        return []

    def note(self, chunk: GenerationChunk) -> None:
        """A chunk of a non-streamed answer went by (for formats that time the answer)."""

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        raise NotImplementedError

    def end(self, last: GenerationChunk) -> list[bytes]:
        return []

    def error(self, api: ApiError) -> list[bytes]:
        return [self.sse({"error": api.message})]

    def whole(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        raise NotImplementedError

    def refusal(self, api: ApiError) -> web.Response:
        """A refusal before the stream started, in this API's error shape."""
        body: dict[str, Any] = {**api.extra, "error": api.message}
        if api.field:
            body["field"] = api.field
        return _json(body, api.status, api.headers)


def _usage(last: GenerationChunk) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


class _OpenAI(_Format):
    prefix, obj = "", ""

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        super().__init__(parsed, model)
        self.id = f"{self.prefix}-{secrets.token_hex(12)}"
        self.usage_key = {"usage": None} if parsed.include_usage else {}

    def envelope(self, choices: list[dict[str, Any]], obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def end(self, last: GenerationChunk) -> list[bytes]:
        out = []
        if self.parsed.include_usage:
            out.append(self.sse({**self.envelope([], self.obj + ".chunk" if self.api == "chat" else self.obj),
                                 "usage": _usage(last)}))
        out.append(b"data: [DONE]\n\n")
        return out

    def error(self, api: ApiError) -> list[bytes]:
        return [self.sse(openai_error_body(api)), b"data: [DONE]\n\n"]

    def refusal(self, api: ApiError) -> web.Response:
        return _json(openai_error_body(api), api.status, api.headers)


def _openai_finish(reason: str | None) -> dict[str, Any]:
    """OpenAI's ``finish_reason`` admits only its own values, so a generation cut by Lastmile's
    ``timeout_s`` deadline is ``"length"`` (cut short by a limit, as clients already handle)
    and says which limit in ``lastmile_finish_reason``."""
    if reason == "timeout":
        return {"finish_reason": "length", "lastmile_finish_reason": "timeout"}
    return {"finish_reason": reason}


class _Chat(_OpenAI):
    api, prefix, obj = "chat", "chatcmpl", "chat.completion"

    def start(self) -> list[bytes]:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self.sse({**self.envelope([first], "chat.completion.chunk"), **self.usage_key})]

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        if not chunk.text and chunk.finish_reason is None:
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, **_openai_finish(chunk.finish_reason)}
        return self.sse({**self.envelope([choice], "chat.completion.chunk"), **self.usage_key})

    def whole(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, **_openai_finish(last.finish_reason)}
        return {**self.envelope([choice], "chat.completion"), "usage": _usage(last)}


class _Completion(_OpenAI):
    api, prefix, obj = "completions", "cmpl", "text_completion"

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        if not chunk.text and chunk.finish_reason is None:
            return None
        choice = {"index": 0, "text": chunk.text, "logprobs": None, **_openai_finish(chunk.finish_reason)}
        return self.sse({**self.envelope([choice], "text_completion"), **self.usage_key})

    def whole(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, **_openai_finish(last.finish_reason)}
        return {**self.envelope([choice], "text_completion"), "usage": _usage(last)}


class _Triton(_Format):
    """Triton's generate extension: ``{"model_name", "model_version", "text_output"}`` per event;
    the last one also carries ``finish_reason`` and the token counts (extra keys)."""

    api = "triton"

    def head(self) -> dict[str, Any]:
        head: dict[str, Any] = {"model_name": self.model, "model_version": "1"}
        if self.parsed.id is not None:
            head["id"] = self.parsed.id
        return head

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        if not chunk.text and chunk.finish_reason is None:
            return None
        body = {**self.head(), "text_output": chunk.text}
        if chunk.finish_reason is not None:
            body.update(finish_reason=chunk.finish_reason, prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens)
        return self.sse(body)

    def whole(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        return {**self.head(), "text_output": text, "finish_reason": last.finish_reason,
                "prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens}


class _Ollama(_Format):
    """Ollama's NDJSON: one object per line, ``done: true`` on the last with the counts and
    durations in nanoseconds (measured here: request received -> first token -> last token)."""

    content_type = "application/x-ndjson"

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        super().__init__(parsed, model)
        self.started = time.perf_counter()
        self.first: float | None = None

    @staticmethod
    def line(obj: Any) -> bytes:
        return orjson.dumps(obj) + b"\n"

    def head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}

    def piece(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def note(self, chunk: GenerationChunk) -> None:
        if chunk.token_ids and self.first is None:
            self.first = time.perf_counter()

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        self.note(chunk)
        if chunk.finish_reason is not None:
            out = self.line({**self.head(), **self.piece(chunk.text), "done": False}) if chunk.text else b""
            return out + self.line(self.final(chunk, ""))
        return self.line({**self.head(), **self.piece(chunk.text), "done": False}) if chunk.text else None

    def final(self, last: GenerationChunk, text: str) -> dict[str, Any]:
        now = time.perf_counter()
        first = self.first or now
        return {**self.head(), **self.piece(text), "done": True, "done_reason": last.finish_reason,
                "total_duration": int((now - self.started) * 1e9), "load_duration": 0,
                "prompt_eval_count": last.prompt_tokens, "prompt_eval_duration": int((first - self.started) * 1e9),
                "eval_count": last.completion_tokens, "eval_duration": int((now - first) * 1e9)}

    def error(self, api: ApiError) -> list[bytes]:
        return [self.line({"error": api.message})]

    def whole(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        return self.final(last, text)


class _OllamaChat(_Ollama):
    api = "ollama"

    def piece(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}


class _OllamaGenerate(_Ollama):
    api = "ollama"

    def piece(self, text: str) -> dict[str, Any]:
        return {"response": text}


# --- the driver --------------------------------------------------------------------------


def _model_name(request: web.Request, name: str) -> str:
    """The loaded model called ``name``, or 404 (with a hint when it is only in the store)."""
    daemon = request.app["daemon"]
    if name in daemon.manager.models:
        return name
    hint = ""
    with contextlib.suppress(Exception):
        if name in daemon.store.names():
            hint = f" (it is in the store: load it with POST /v2/repository/models/{name}/load or `lastmile load {name}`)"
    raise ApiError(404, f"model {name!r} is not loaded{hint}", field="model")


async def _close(stream: AsyncIterator[GenerationChunk]) -> None:
    """Close the generator (cancels the sequence in the runner); shielded so that a handler
    being cancelled still frees the slot."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.shield(aclose())


async def _next(stream: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:  # the contract ends every stream with a finish_reason chunk
        raise RunnerDied("the generation ended without a finish reason") from None


async def _serve(request: web.Request, parsed: ParsedRequest, fmt_class: type[_Format]) -> web.StreamResponse:
    started = time.perf_counter()
    metrics = request.app[GENERATION_METRICS]
    name = _model_name(request, parsed.model)
    fmt = fmt_class(parsed, name)
    observer = metrics.stream(name, fmt.api, started)
    stream = request.app["daemon"].manager.generate(name, parsed.request)
    response: web.StreamResponse | None = None
    outcome = "error"
    try:
        try:
            chunk = await _next(stream)  # every refusal arrives here, before any header is sent
            if not parsed.stream:
                parts: list[str] = []
                while True:
                    observer.chunk(time.perf_counter(), chunk.prompt_tokens, len(chunk.token_ids))
                    fmt.note(chunk)
                    parts.append(chunk.text)
                    if chunk.finish_reason is not None:
                        break
                    chunk = await _next(stream)
                outcome = "success"
                return _json(fmt.whole("".join(parts), chunk))
        except Exception as exc:  # noqa: BLE001 - mapped to a status; a bug is logged and 500
            api = _mapped(exc)
            outcome = _outcome(api.status)
            return fmt.refusal(api)
        response = web.StreamResponse(headers={**SSE_HEADERS, "Content-Type": fmt.content_type})
        await response.prepare(request)
        pending = b"".join(fmt.start())  # the opening events leave with the first token, in one write
        while True:
            event = fmt.chunk(chunk)
            if event is not None or pending:
                await response.write(pending + (event or b""))  # backpressure: the next chunk is pulled only once this one left
                pending = b""
            observer.chunk(time.perf_counter(), chunk.prompt_tokens, len(chunk.token_ids))
            if chunk.finish_reason is not None:
                break
            try:
                chunk = await _next(stream)
            except Exception as exc:  # noqa: BLE001 - the runner died (or failed) mid-stream: an error event, then the end
                api = _mapped(exc)
                outcome = _outcome(api.status)
                for event in fmt.error(api):
                    await response.write(event)
                await response.write_eof()
                return response
        for event in fmt.end(chunk):
            await response.write(event)
        await response.write_eof()
        outcome = "success"
        return response
    except ConnectionResetError:
        outcome = "disconnected"
        if response is None:
            raise
        return response  # the client went away mid-stream: nothing more to say to it
    except asyncio.CancelledError:
        outcome = "disconnected"
        raise
    finally:
        observer.end(outcome)
        await _close(stream)


async def _openai(request: web.Request, parse: Any, fmt_class: type[_Format]) -> web.StreamResponse:
    """Refusals of the body itself in OpenAI's error shape too (the middleware's is Lastmile's)."""
    try:
        parsed = parse(await read_json(request))
        return await _serve(request, parsed, fmt_class)
    except (ApiError, ParamError) as exc:
        api = _mapped(exc)
        return _json(openai_error_body(api), api.status, api.headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app["config"].server["max_body_mb"]
        return _json(openai_error_body(ApiError(413, f"request body too large (limit {limit} MB)")), 413)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, parse_chat, _Chat)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, parse_completion, _Completion)


def _parsed(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A body parsed by one of generate_params' parsers, its refusal as the API's 4xx."""
    try:
        return parse(*args, **kwargs)
    except ParamError as exc:
        raise _mapped(exc) from None


async def _triton(request: web.Request, *, stream: bool) -> web.StreamResponse:
    version = request.match_info.get("version")
    name = request.match_info["name"]
    if version is not None and version != "1":
        raise ApiError(404, f"model {name!r} has no version {version!r} (only version 1 is served)")
    return await _serve(request, _parsed(parse_triton, await read_json(request), name, stream=stream), _Triton)


@routes.post("/v2/models/{name}/generate")
@routes.post("/v2/models/{name}/versions/{version}/generate")
async def triton_generate(request: web.Request) -> web.StreamResponse:
    return await _triton(request, stream=False)


@routes.post("/v2/models/{name}/generate_stream")
@routes.post("/v2/models/{name}/versions/{version}/generate_stream")
async def triton_generate_stream(request: web.Request) -> web.StreamResponse:
    return await _triton(request, stream=True)



# --- Ollama ----------------------------------------------------------------------------------


async def _ollama(request: web.Request, parse: Any, fmt_class: type[_Format]) -> web.StreamResponse:
    return await _serve(request, _parsed(parse, await read_json(request)), fmt_class)


@routes.post("/api/chat")
async def ollama_chat(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, parse_ollama_chat, _OllamaChat)


@routes.post("/api/generate")
async def ollama_generate(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, parse_ollama_generate, _OllamaGenerate)


def _folder_facts(artifact: Any) -> tuple[int, str, float]:
    """Size in bytes, a digest identifying this version of the folder (sha256 over config.json
    and the weight files' names and sizes: cheap, and it changes when the weights do), mtime."""
    folder = Path(artifact)
    digest = hashlib.sha256()
    size, mtime = 0, 0.0
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
        for p in files:
            st = p.stat()
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
            if p.name == "config.json":
                digest.update(p.read_bytes())
            elif p.suffix in (".safetensors", ".gguf", ".onnx", ".bin"):
                digest.update(f"{p.name}:{st.st_size}".encode())
    except OSError:
        pass
    return size, digest.hexdigest(), mtime


def _ollama_row(name: str, manifest: Any) -> dict[str, Any]:
    size, digest, mtime = _folder_facts(getattr(manifest, "artifact", ""))
    return {"name": f"{name}:latest", "model": f"{name}:latest", "size": size, "digest": digest,
            "modified_at": datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).isoformat(),
            "details": {"format": getattr(manifest, "format", ""), "family": "", "families": None,
                        "parameter_size": "", "quantization_level": ""}}


@routes.get("/api/tags")
async def ollama_tags(request: web.Request) -> web.Response:
    """The store's generation models, in Ollama's listing."""
    from lastmile.runtime.generation.config import is_generation_manifest

    daemon = request.app["daemon"]

    def rows() -> list[dict[str, Any]]:
        out = []
        for entry in daemon.store.entries():
            with contextlib.suppress(Exception):
                if entry.manifest is not None and is_generation_manifest(entry.manifest):
                    out.append(_ollama_row(entry.name, entry.manifest))
        return out

    return _json({"models": await asyncio.get_running_loop().run_in_executor(None, rows)})


@routes.get("/api/ps")
async def ollama_ps(request: web.Request) -> web.Response:
    """The loaded generation models, with the memory their runners use."""
    daemon = request.app["daemon"]
    models = []
    for name, model in list(daemon.manager.models.items()):
        if not getattr(model, "generation", False):
            continue
        row = _ollama_row(name, model.manifest)
        memory = model.memory.as_dict() if hasattr(model.memory, "as_dict") else {}
        row["size"] = memory.get("used_bytes") or row["size"]
        row["size_vram"] = sum(v for d, v in (memory.get("device_bytes") or {}).items() if d != "host" and v) or 0
        row["expires_at"] = None  # unloaded only on request (or by memory policy)
        models.append(row)
    return _json({"models": models})


@routes.get("/api/version")
async def ollama_version(request: web.Request) -> web.Response:
    return _json({"version": request.app["daemon"].version})
