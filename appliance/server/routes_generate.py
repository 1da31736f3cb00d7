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
- **A slow reader slows nobody, and cancellation.** Each event is written and awaited before the
  next chunk is taken from the stream; the runner does not wait for a slow reader (the batch's
  step serves every sequence), so its sequence's chunks wait in the daemon's
  :class:`~lastmile.runtime.generation.runner.GenerationStream`, at most ``max_tokens`` of
  them (bounded by the model's ``max_context``). A client that goes away (write fails, or
  aiohttp cancels the handler) closes the generator at once, which cancels the sequence in the
  runner and frees its slot and KV cache.
- **A runner that dies mid-stream** turns into one error event and the end of the stream
  (``data: [DONE]`` for OpenAI), never a hang.

- **Nothing reaches the runner that it would fail on or refuse anyway** (:func:`check_request`):
  top_k past the model's vocabulary, token ids past it, and a prompt whose byte length alone
  proves it can never fit the context (the most bytes one token of the model's tokenizer
  covers, read once per load). The runner is one process for every stream of a model, so
  what it refuses still costs everyone a pause; what it fails on costs everyone the stream.
- **Deadlines.** The model's ``timeout_s`` bounds every generation (the runner cuts it,
  ``finish_reason`` "timeout"); a request that waited that long for a slot without a first
  token is refused with 503 + Retry-After, and the daemon ends a stream itself if the runner's
  cut does not come within a second of the deadline.

The wire formats differ only in how a chunk, an error and the end are written (one small
class each below). Bodies are parsed by :mod:`generate_params`. Ollama's preload calls (no
prompt: load; ``keep_alive: 0``: unload) and ``/api/show`` are answered here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import re
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import orjson
from aiohttp import web

from lastmile.appliance.server.auth import caller_of
from lastmile.appliance.server.generate_params import (
    ParamError, ParsedRequest, Preload, max_bytes_per_token, model_name, parse_chat, parse_completion, parse_ollama_chat,
    parse_ollama_generate, parse_ollama_preload, parse_triton,
)
from lastmile.appliance.server.generation_metrics import GenerationMetrics
from lastmile.appliance.server.http import ApiError, openai_error_payload, read_json, timeout_after, to_api_error
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
    app[_LIMITS] = {}
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


def openai_error_body(api: ApiError) -> dict[str, Any]:
    """OpenAI's error shape for a refused generation (plus the counts of a context overflow, so
    a client can shorten by the right amount)."""
    code = None
    if api.status != 404 and api.extra.get("max_context") is not None:
        code = "context_length_exceeded"
    elif api.status == 503:
        code = api.extra.get("code")
    extra = {k: v for k, v in api.extra.items() if k not in ("error", "code")}
    return openai_error_payload(api.status, api.message, param=api.field, code=code, **extra)


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


#: A constrained tool call's opening, exactly as the grammar writes it (compact JSON, "name"
#: first; a tool's name is [A-Za-z0-9_-], so it needs no escaping).
_CALL_HEAD = re.compile(r'\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')


def parse_call(text: str, tools: Any, *, constrained: bool = False) -> tuple[str, dict[str, Any]] | None:
    """``(name, arguments)`` when ``text`` is one ``{"name", "arguments"}`` object naming one
    of ``tools`` (whose arguments validate against its parameters), else None. Validation is
    ``jsonschema``'s when it is installed; without it only a ``constrained`` answer (the
    grammar already enforced the parameters) counts as a call."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"} or not isinstance(value["arguments"], dict):
        return None
    tool = next((t for t in tools or () if t["name"] == value["name"]), None)
    if tool is None:
        return None
    try:
        import jsonschema
    except ImportError:
        return (tool["name"], value["arguments"]) if constrained else None
    try:
        jsonschema.validate(value["arguments"], tool.get("parameters") or {})
    except Exception:  # noqa: BLE001 - a schema or an instance jsonschema refuses: not a call
        return None
    return tool["name"], value["arguments"]


class _Chat(_OpenAI):
    """Chat completions; with tools, a constrained call ("call") is answered as ``tool_calls``
    (streamed as deltas of ``tool_calls[0].function.arguments``), and an "auto" answer whose
    whole text is a call is answered as one (streamed: held back once it starts with "{")."""

    api, prefix, obj = "chat", "chatcmpl", "chat.completion"

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        super().__init__(parsed, model)
        self.call_id = f"call_{secrets.token_hex(12)}"
        self.buf = ""  # a tool answer's text so far
        self.head = False  # the call's name went out
        self.sent = 0  # characters of the arguments that went out
        self.held = False  # an "auto" answer held back while it may be a call

    def start(self) -> list[bytes]:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self.sse({**self.envelope([first], "chat.completion.chunk"), **self.usage_key})]

    def _event(self, delta: dict[str, Any], reason: str | None, finish: dict[str, Any] | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, **(finish or _openai_finish(reason))}
        return self.sse({**self.envelope([choice], "chat.completion.chunk"), **self.usage_key})

    def _call_delta(self, args: str, *, head: str | None = None) -> dict[str, Any]:
        fn: dict[str, Any] = {"arguments": args}
        call: dict[str, Any] = {"index": 0, "function": fn}
        if head is not None:
            call.update(id=self.call_id, type="function")
            fn["name"] = head
        return {"tool_calls": [call]}

    def _call_chunk(self, chunk: GenerationChunk) -> bytes | None:
        self.buf += chunk.text
        out = b""
        m = _CALL_HEAD.match(self.buf)
        done = chunk.finish_reason is not None
        if m and not self.head:
            self.head = True
            out += self._event(self._call_delta("", head=m.group(1)), None)
        if self.head:
            args = self.buf[m.end():]  # type: ignore[union-attr]
            ok = done and chunk.finish_reason == "stop" and parse_call(self.buf, self.parsed.request.tools, constrained=True)
            upto = len(args) - 1 if (not done or ok) else len(args)  # the last "}" closes the call, not the arguments
            if upto > self.sent:
                out += self._event(self._call_delta(args[self.sent:upto]), None)
                self.sent = upto
            if done:
                out += self._event({}, None, {"finish_reason": "tool_calls"} if ok else _openai_finish(
                    "length" if chunk.finish_reason == "stop" else chunk.finish_reason))
        elif done:  # cut before the call's name: what there is, as text, and the honest reason
            if self.buf:
                out += self._event({"content": self.buf}, None)
            out += self._event({}, chunk.finish_reason)
        return out or None

    def _auto_chunk(self, chunk: GenerationChunk) -> bytes | None:
        if not self.held and not self.buf.strip() and chunk.text.lstrip().startswith("{"):
            self.held = True
        if not self.held:
            self.buf += chunk.text
            if not chunk.text and chunk.finish_reason is None:
                return None
            return self._event({"content": chunk.text} if chunk.text else {}, chunk.finish_reason)
        self.buf += chunk.text
        if chunk.finish_reason is None:
            return None
        call = parse_call(self.buf.strip(), self.parsed.request.tools) if chunk.finish_reason == "stop" else None
        if call is None:
            return self._event({"content": self.buf}, chunk.finish_reason)
        args = json.dumps(call[1])
        return (self._event(self._call_delta("", head=call[0]), None) + self._event(self._call_delta(args), None)
                + self._event({}, None, {"finish_reason": "tool_calls"}))

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        if self.parsed.tool_answer == "call":
            return self._call_chunk(chunk)
        if self.parsed.tool_answer == "auto":
            return self._auto_chunk(chunk)
        if not chunk.text and chunk.finish_reason is None:
            return None
        delta = {"content": chunk.text} if chunk.text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, **_openai_finish(chunk.finish_reason)}
        return self.sse({**self.envelope([choice], "chat.completion.chunk"), **self.usage_key})

    def whole(self, text: str, last: GenerationChunk) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        finish = _openai_finish(last.finish_reason)
        if self.parsed.tool_answer and last.finish_reason == "stop":
            call = parse_call(text.strip(), self.parsed.request.tools, constrained=self.parsed.tool_answer == "call")
            if call is not None:
                message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                    {"id": self.call_id, "type": "function",
                     "function": {"name": call[0], "arguments": json.dumps(call[1])}}]}
                finish = {"finish_reason": "tool_calls"}
            elif self.parsed.tool_answer == "call":  # never claim a call that does not validate
                finish = {"finish_reason": "length", "lastmile_finish_reason": "invalid_tool_call"}
        choice = {"index": 0, "message": message, "logprobs": None, **finish}
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
    """With tools, a call comes in Ollama's shape: ``message.tool_calls[].function`` with
    ``name`` and ``arguments`` an object; streamed, a tool answer is held back to the end."""

    api = "ollama"

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        super().__init__(parsed, model)
        self.buf = ""

    def piece(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        if not self.parsed.tool_answer:
            return super().chunk(chunk)
        self.note(chunk)
        self.buf += chunk.text
        return self.line(self.final(chunk, self.buf)) if chunk.finish_reason is not None else None

    def final(self, last: GenerationChunk, text: str) -> dict[str, Any]:
        out = super().final(last, text)
        if self.parsed.tool_answer and last.finish_reason == "stop":
            call = parse_call(text.strip(), self.parsed.request.tools, constrained=self.parsed.tool_answer == "call")
            if call is not None:
                out["message"] = {"role": "assistant", "content": "",
                                  "tool_calls": [{"function": {"name": call[0], "arguments": call[1]}}]}
            elif self.parsed.tool_answer == "call":
                out["done_reason"] = "length"  # never claim a call that does not validate
        return out


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


# --- what the daemon checks before the runner sees a request ---------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Limits:
    """What bounds a request to one loaded generation model, read from its folder once per
    load: the vocabulary (top_k, token ids), the context and the most bytes one token of its
    tokenizer can stand for (None: no such bound, see ``max_bytes_per_token``)."""

    vocab_size: int | None
    max_context: int | None
    bytes_per_token: int | None


_LIMITS = web.AppKey("generation_limits", dict)


def _read_limits(folder: Path, max_context: int | None) -> _Limits:
    vocab = None
    with contextlib.suppress(OSError, ValueError, TypeError):
        vocab = int(json.loads((folder / "config.json").read_text()).get("vocab_size") or 0) or None
    per_token = None
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        per_token = max_bytes_per_token(json.loads((folder / "tokenizer.json").read_bytes()))
    return _Limits(vocab, max_context, per_token)


async def _limits(request: web.Request, name: str, model: Any) -> _Limits:
    cache = request.app[_LIMITS]
    key = (name, id(model), getattr(model, "loaded_at", 0.0))
    limits = cache.get(key)
    if limits is None:
        info = getattr(model, "info", None) or {}
        max_context = info.get("max_context") if isinstance(info.get("max_context"), int) else None
        folder = Path(str(getattr(model.manifest, "artifact", "")))
        limits = await asyncio.get_running_loop().run_in_executor(None, _read_limits, folder, max_context)
        for old in [k for k in cache if k[0] == name]:
            del cache[old]
        cache[key] = limits
    return limits


def _input_field(parsed: ParsedRequest, api: str) -> str:
    return "text_input" if api == "triton" else parsed.request.input_field()


def check_request(parsed: ParsedRequest, limits: _Limits, api: str) -> None:
    """Refuse with a 400 naming the field whatever this model's runner would fail on or
    refuse anyway: top_k past the vocabulary, token ids past it, and a prompt that can never
    fit its context (its byte length over the most bytes one token covers already gives at
    least max_context tokens), before the runner tokenizes a byte of it. ``prompt_tokens`` of
    that refusal is the lower bound (``prompt_tokens_at_least`` says so); a prompt that may fit
    goes on to the runner, which refuses with the exact count what does not."""
    params = parsed.request.params
    prefix = parsed.param_prefix
    try:
        params.validate(limits.vocab_size)
    except InvalidSamplingParams as exc:
        field = exc.field or "parameters"
        raise ParamError(prefix + field, str(exc).split(": ", 1)[-1]) from None
    ids = parsed.request.prompt_token_ids
    if ids is not None and limits.vocab_size and max(ids) >= limits.vocab_size:
        raise ParamError("prompt", f"token ids must be in [0, {limits.vocab_size}) for this model, got {max(ids)}")
    ctx = limits.max_context
    if not ctx:
        return
    if ids is not None:
        at_least, how = len(ids), f"{len(ids)} tokens"
    elif limits.bytes_per_token and parsed.prompt_bytes:
        at_least = -(-parsed.prompt_bytes // limits.bytes_per_token)
        how = (f"{parsed.prompt_bytes} bytes, so at least {at_least} tokens (one token of this model's tokenizer "
               f"covers at most {limits.bytes_per_token} bytes)")
    else:
        return
    if at_least < ctx:
        return  # it may fit: the runner counts exactly (what it tokenizes is bounded by ctx x bytes per token)
    field = _input_field(parsed, api)
    raise ApiError(400, f"{field}: the prompt holds {how}; this model's max_context is {ctx} (prompt and max_tokens "
                        "together); shorten the prompt", field=field,
                   extra={"prompt_tokens": at_least, "prompt_tokens_at_least": at_least, "max_tokens": params.max_tokens,
                          "max_context": ctx})


def _deadlines(model: Any, parsed: ParsedRequest) -> tuple[ParsedRequest, float, bool]:
    """The model's ``timeout_s`` bounds every generation, queueing included: the runner cuts a
    stream at ``min(timeout_s, the request's timeout_s)`` (finish_reason "timeout"), and a
    request that gets no first token within the model's ``timeout_s`` (it waited for a slot)
    is refused with 503 + Retry-After. Returns the request with its deadline, the model's
    timeout, and whether the request's own deadline is the shorter one (then a cut before the
    first token is the client's choice: a "timeout" answer, not a 503)."""
    timeout = float(getattr(model.settings, "timeout_s", 0.0) or 0.0)
    own = parsed.request.deadline_s
    if not timeout:
        return parsed, 0.0, own is not None
    if own is not None and own < timeout:
        return parsed, timeout, True
    return dataclasses.replace(parsed, request=dataclasses.replace(parsed.request, deadline_s=timeout)), timeout, False


#: How long past the deadline the daemon waits for the runner's own cut before cutting itself.
DEADLINE_GRACE_S = 1.0


class QueueDeadline(Exception):
    """No first token within the model's ``timeout_s``: 503 + Retry-After."""

    def __init__(self, name: str, timeout_s: float) -> None:
        super().__init__(f"model {name!r}: no free generation slot within {timeout_s:g} s (the model's timeout_s); "
                         "every slot is busy: retry later")
        self.timeout_s = timeout_s

    def api(self) -> ApiError:
        return ApiError(503, str(self), headers={"Retry-After": str(max(1, math.ceil(min(self.timeout_s, 30.0))))},
                        extra={"code": "queue_timeout"})


async def _next_within(stream: AsyncIterator[GenerationChunk], until: float | None) -> GenerationChunk:
    if until is None:
        return await _next(stream)
    async with timeout_after(max(0.0, until - time.monotonic())):
        return await _next(stream)


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
    model = request.app["daemon"].manager.models[name]  # _model_name: it is loaded
    if getattr(model, "generation", False):
        try:
            check_request(parsed, await _limits(request, name, model), fmt.api)  # before the runner sees it
        except (ParamError, ApiError) as exc:
            metrics.stream(name, fmt.api, started).end("bad_request")
            return fmt.refusal(_mapped(exc))
        parsed, timeout, own_deadline = _deadlines(model, parsed)
    else:
        timeout, own_deadline = 0.0, False  # refused by manager.generate (not a generation model)
    submitted = time.monotonic()
    first_by = submitted + timeout + DEADLINE_GRACE_S if timeout else None  # the runner's cut comes first
    deadline = parsed.request.deadline_s
    last_by = submitted + deadline + DEADLINE_GRACE_S if deadline else None
    observer = metrics.stream(name, fmt.api, started)
    stream = request.app["daemon"].manager.generate(name, parsed.request)
    response: web.StreamResponse | None = None
    outcome = "error"

    async def following(previous: GenerationChunk) -> GenerationChunk:
        """The next chunk; past the deadline (and the runner's grace) the daemon ends the stream itself."""
        try:
            return await _next_within(stream, last_by)
        except asyncio.TimeoutError:
            await _close(stream)
            return GenerationChunk("", (), "timeout", previous.prompt_tokens, previous.completion_tokens)

    try:
        try:
            try:
                chunk = await _next_within(stream, first_by)  # every refusal arrives here, before any header is sent
            except asyncio.TimeoutError:
                raise QueueDeadline(name, timeout) from None
            if chunk.finish_reason == "timeout" and not chunk.token_ids and not chunk.completion_tokens and not own_deadline:
                raise QueueDeadline(name, timeout)  # the runner cut it while it waited for a slot
            if not parsed.stream:
                parts: list[str] = []
                while True:
                    observer.chunk(time.perf_counter(), chunk.prompt_tokens, len(chunk.token_ids))
                    fmt.note(chunk)
                    parts.append(chunk.text)
                    if chunk.finish_reason is not None:
                        break
                    chunk = await following(chunk)
                outcome = "success"
                return _json(fmt.whole("".join(parts), chunk))
        except Exception as exc:  # noqa: BLE001 - mapped to a status; a bug is logged and 500
            api = exc.api() if isinstance(exc, QueueDeadline) else _mapped(exc)
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
                chunk = await following(chunk)
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


async def _ollama(request: web.Request, parse: Any, fmt_class: type[_Format], *, chat: bool) -> web.StreamResponse:
    body = await read_json(request)
    preload = _parsed(parse_ollama_preload, body, chat=chat)
    if preload is not None:
        return await _ollama_preload(request, preload)
    return await _serve(request, _parsed(parse, body), fmt_class)


def _ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


async def _ollama_preload(request: web.Request, preload: Preload) -> web.Response:
    """Ollama's load and unload calls: an empty prompt (or no messages) loads the model and
    answers ``done: true, done_reason: "load"``; with ``keep_alive: 0`` it unloads it now
    (``done_reason: "unload"``). Loading and unloading change the daemon, so they need the
    operator role (a viewer may "load" a model that is loaded already: nothing changes)."""
    daemon = request.app["daemon"]
    name = preload.model
    caller = caller_of(request)
    operator = caller is None or caller.role == "operator"
    loaded = name in daemon.manager.models
    head = {"model": name, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    piece = {"message": {"role": "assistant", "content": ""}} if preload.chat else {"response": ""}
    started = time.perf_counter()
    if loaded and not getattr(daemon.manager.models[name], "generation", False):
        return _ollama_error(400, f"model {name!r} is not a generation model")
    if preload.unload:
        if not loaded:
            return _json({**head, **piece, "done": True, "done_reason": "unload"})
        if not operator:
            return _ollama_error(403, f"unloading {name!r} needs the operator role; {caller.describe()} is {caller.role}")
        await request.app["dataplane"].unload(name)
        return _json({**head, **piece, "done": True, "done_reason": "unload"})
    if not loaded:
        from lastmile.runtime.generation.config import is_generation_manifest

        try:
            manifest = await asyncio.get_running_loop().run_in_executor(None, daemon.store.get, name)
        except Exception:  # noqa: BLE001 - not in the store (or unreadable): Ollama's 404
            return _ollama_error(404, f"model {name!r} not found")
        if not is_generation_manifest(manifest):
            return _ollama_error(400, f"model {name!r} is not a generation model")
        if not operator:
            return _ollama_error(403, f"loading {name!r} needs the operator role; {caller.describe()} is {caller.role}")
        await request.app["dataplane"].load(name, {})
    return _json({**head, **piece, "done": True, "done_reason": "load",
                  "total_duration": int((time.perf_counter() - started) * 1e9),
                  "load_duration": int((time.perf_counter() - started) * 1e9) if not loaded else 0})


@routes.post("/api/chat")
async def ollama_chat(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, parse_ollama_chat, _OllamaChat, chat=True)


@routes.post("/api/generate")
async def ollama_generate(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, parse_ollama_generate, _OllamaGenerate, chat=False)


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


# --- Ollama's /api/show ------------------------------------------------------------------------


def _safetensors_parameters(folder: Path) -> tuple[int, str]:
    """The parameter count and the most common dtype of the folder's safetensors files (their
    JSON headers only: 8 bytes of length, then the header)."""
    total, dtypes = 0, {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= 100_000_000:
                    continue
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            continue
        for key, tensor in header.items():
            if key == "__metadata__" or not isinstance(tensor, dict):
                continue
            numel = math.prod(int(d) for d in tensor.get("shape") or [])
            total += numel
            dtypes[tensor.get("dtype", "")] = dtypes.get(tensor.get("dtype", ""), 0) + numel
    return total, max(dtypes, key=dtypes.get) if dtypes else ""


def _parameter_size(count: int) -> str:
    if count <= 0:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}" if count < 100 * scale else f"{count / scale:.0f}{unit}"
    return str(count)


def _show(name: str, manifest: Any) -> dict[str, Any]:
    """Ollama's ``/api/show`` answer, as far as an HF causal-LM folder tells: the chat template,
    the architecture's numbers (``model_info`` uses GGUF's key names, ``<arch>.context_length``
    and so on), the parameter count and dtype from the safetensors headers."""
    folder = Path(str(getattr(manifest, "artifact", "")))
    cfg: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        cfg = json.loads((folder / "config.json").read_text())
    template = ""
    with contextlib.suppress(OSError, ValueError):
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or ""
    if not isinstance(template, str):  # a list of named templates
        template = next((t.get("template", "") for t in template if isinstance(t, dict) and t.get("name") == "default"), "")
    if not template:
        with contextlib.suppress(OSError):
            template = (folder / "chat_template.jinja").read_text()
    count, dtype = _safetensors_parameters(folder)
    arch = str(cfg.get("model_type") or "")
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": count,
                            "general.basename": name}
    for gguf, hf in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                     ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
                     ("attention.head_count", "num_attention_heads"), ("attention.head_count_kv", "num_key_value_heads"),
                     ("attention.layer_norm_rms_epsilon", "rms_norm_eps"), ("rope.freq_base", "rope_theta"),
                     ("vocab_size", "vocab_size")):
        if isinstance(cfg.get(hf), (int, float)) and not isinstance(cfg.get(hf), bool):
            info[f"{arch}.{gguf}"] = cfg[hf]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(cfg.get(key), int):
            info[f"tokenizer.ggml.{key}"] = cfg[key]
    size, digest, mtime = _folder_facts(folder)
    parameters = "\n".join(f"{k} {v}" for k, v in (("num_ctx", cfg.get("max_position_embeddings")),) if v)
    modelfile = (f"# Modelfile of {name} as Lastmile serves it (an HF folder, not a GGUF blob)\nFROM {folder}\n"
                 + (f'TEMPLATE """{template}"""\n' if template else "")
                 + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()))
    return {
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": {"parent_model": "", "format": getattr(manifest, "format", "") or "", "family": arch,
                    "families": [arch] if arch else None, "parameter_size": _parameter_size(count),
                    "quantization_level": dtype},
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).isoformat(),
    }


@routes.post("/api/show")
async def ollama_show(request: web.Request) -> web.Response:
    """A store model's template, parameters and architecture, in Ollama's shape."""
    from lastmile.runtime.generation.config import is_generation_manifest

    body = await read_json(request)
    try:
        key = "model" if "model" in body or "name" not in body else "name"  # older clients send "name"
        name = model_name(body, key)
    except ParamError as exc:
        return _ollama_error(400, exc.message)
    unknown = sorted(k for k in body if k not in ("model", "name", "verbose"))
    if unknown:
        return _ollama_error(400, f"{unknown[0]}: unknown field (this endpoint takes: model, verbose)")
    name = name[: -len(":latest")] if name.endswith(":latest") else name
    daemon = request.app["daemon"]
    loaded = daemon.manager.models.get(name)
    if loaded is not None:
        manifest = loaded.manifest
    else:
        try:
            manifest = await asyncio.get_running_loop().run_in_executor(None, daemon.store.get, name)
        except Exception:  # noqa: BLE001 - not in the store (or unreadable): Ollama's 404
            return _ollama_error(404, f"model {name!r} not found")
    if not is_generation_manifest(manifest):
        return _ollama_error(404, f"model {name!r} not found (it is not a generation model)")
    return _json(await asyncio.get_running_loop().run_in_executor(None, _show, name, manifest))
