"""JSON errors for every failure: the V2 protocol's ``{"error": "..."}`` body, plus ``field``
when one part of the request is to blame, so scripts and the TUI can show the daemon's words."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from lastmile.appliance.v2codec import BadRequest
from lastmile.models.errors import FormatError, InvalidModelName, ManifestError, ModelNotFoundError, StoreEscapeError
from lastmile.models.settings import SettingError
from lastmile.models.signatures import SignaturePending
from lastmile.runtime.backends.base import BackendError
from lastmile.runtime.errors import BatchTooLarge, InferenceError, InvalidBatch, LoadError, LoadTimeout, ModelUnavailable, QueueFull, RequestTimeout, RunnerDied
from lastmile.runtime.manager import ModelNotLoaded, SharedMemoryExhausted
from lastmile.runtime.memory import InsufficientMemory, MemoryPressure

logger = logging.getLogger("lastmile.http")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}
        self.extra = extra or {}  # more keys for the error body (e.g. a refused load's numbers)


def error_response(status: int, message: str, *, field: str | None = None, headers: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {**(extra or {}), "error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


def path_error_response(path: str, status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """An error before any route ran, in the shape the route's clients parse: OpenAI's
    ``{"error": {"message", "type", "param", "code"}}`` under ``/v1/``, Lastmile's elsewhere."""
    if path.startswith("/v1/"):
        return web.json_response(openai_error_payload(status, message), status=status, headers=headers)
    return error_response(status, message, headers=headers)


#: OpenAI's error ``type`` per HTTP status (its API's own names where it has one), and the
#: ``code`` a status gets when the caller gives none: the one table every ``/v1/`` error uses
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                      422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error",
                      504: "timeout_error", 507: "insufficient_memory_error"}
OPENAI_ERROR_CODES = {401: "invalid_api_key", 403: "insufficient_permissions", 404: "model_not_found",
                      429: "rate_limit_exceeded", 503: "overloaded"}


def openai_error_payload(status: int, message: str, *, param: str | None = None, code: str | None = None,
                      **extra: Any) -> dict[str, Any]:
    """OpenAI's error shape, ``{"error": {"message", "type", "param", "code", ...}}``, which its
    clients parse (``openai.NotFoundError`` and the like come from the status)."""
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or OPENAI_ERROR_CODES.get(status), **extra}}


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


def to_api_error(exc: BaseException) -> ApiError | None:
    """The HTTP meaning of the errors the layers below raise; None for a real bug (500)."""
    match exc:
        case ApiError():
            return exc
        case BadRequest():
            return ApiError(400, str(exc), field=exc.field)
        case SettingError():
            return ApiError(400, str(exc), field=f"parameters.{exc.key}")
        case InvalidModelName() | StoreEscapeError():
            return ApiError(400, str(exc), field="name")
        case ModelNotFoundError():
            return ApiError(404, str(exc))
        case ModelNotLoaded():
            return ApiError(404, str(exc))
        case SignaturePending():
            return ApiError(503, str(exc), headers=_retry_after(exc.retry_after_s))
        case ManifestError() | FormatError():
            return ApiError(422, str(exc))
        case InvalidBatch():
            return ApiError(400, str(exc), field=f"inputs.{exc.key}" if exc.key else "inputs")
        case BatchTooLarge():
            return ApiError(400, str(exc), field="inputs")
        case SharedMemoryExhausted():
            return ApiError(507, str(exc), headers=_retry_after(5.0))
        case InsufficientMemory():
            return ApiError(507, str(exc), extra={"memory": exc.detail})
        case MemoryPressure():
            return ApiError(503, str(exc), headers=_retry_after(exc.retry_after_s))
        case QueueFull():
            return ApiError(503, str(exc), headers=_retry_after(getattr(exc, "retry_after_s", 1.0)))
        case ModelUnavailable() | RunnerDied():
            return ApiError(503, str(exc), headers=_retry_after(1.0))
        case RequestTimeout():
            return ApiError(504, str(exc))
        case LoadTimeout():
            return ApiError(504, str(exc))
        case BackendError():
            return ApiError(422, str(exc))
        case LoadError():
            return ApiError(500, str(exc))
        case InferenceError():
            return ApiError(500, str(exc))
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        elif exc.status == 413:
            message = f"request body too large (limit {request.app['config'].server['max_body_mb']} MB)"
        return error_response(exc.status, message, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON error
        api = to_api_error(exc)
        if api is None:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        return error_response(api.status, api.message, field=api.field, headers=api.headers, extra=api.extra)


async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}`` when not ``required``."""
    body = await request.read()
    if not body.strip():
        if required:
            raise ApiError(400, "request body is empty; expected a JSON object")
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads gives up past a few thousand levels of nesting
        raise ApiError(400, "body is JSON nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise ApiError(400, f"body is not valid JSON for this server: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "body must be a JSON object")
    return value


if hasattr(asyncio, "timeout"):  # Python >= 3.11
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as _timeout  # aiohttp's own dependency there

#: ``async with timeout_after(seconds):`` on every supported Python (a timer, not a task).
timeout_after = _timeout


async def _refuse_and_close(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send ``response`` and close the connection without reading the rest of the body."""
    response.headers["Connection"] = "close"
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def body_deadline(timeout_s: float, max_body_bytes: int | None = None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The whole request body within ``timeout_s`` (``server.body_timeout_s``), read before the
    request takes a concurrency slot: a peer that sends its body slowly holds a connection for
    at most that long and never a slot that a complete request could use. A late body gets
    408 and the connection is closed (nothing more is read from it). Handlers read the body
    from aiohttp's cache afterwards; ``client_max_size`` still bounds its size (413).

    A ``Content-Length`` over ``max_body_bytes`` is refused (413) from the headers alone,
    before a byte of the body is read; a body that cannot be decoded (``Content-Encoding:
    gzip`` on a plain body) is a 400, not a 500."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        declared = request.content_length
        if max_body_bytes is not None and declared is not None and declared > max_body_bytes:
            logger.warning("refused %s %s: Content-Length %d over the body limit %d", request.method, request.path,
                           declared, max_body_bytes)
            return await _refuse_and_close(request, path_error_response(
                request.path, 413, f"request body too large: Content-Length {declared} is over the limit of "
                                   f"{max_body_bytes // (1024 * 1024)} MB (server.max_body_mb)"))
        if request.body_exists:
            try:
                async with _timeout(timeout_s):  # a timer, not a task: nothing measurable per request
                    await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise
            except (RequestPayloadError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
                logger.warning("refused %s %s: the body cannot be read: %s", request.method, request.path, exc)
                return await _refuse_and_close(request, path_error_response(
                    request.path, 400, f"request body cannot be read (Content-Encoding "
                                       f"{request.headers.get('Content-Encoding', 'identity')!r}): {exc}"))
            except asyncio.TimeoutError:
                logger.warning("cut off %s %s: body not complete within %g s (server.body_timeout_s)", request.method, request.path, timeout_s)
                response = error_response(408, f"request body not received within {timeout_s:g} s (server.body_timeout_s)",
                                          headers={"Connection": "close"})
                await response.prepare(request)
                await response.write_eof()
                request.protocol.force_close()  # do not linger reading the rest of a slow body
                return response
        return await handler(request)

    return middleware


def concurrency_limit(limit: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """At most ``limit`` requests in the daemon at once; beyond it 503 + Retry-After, so a flood
    costs a few bytes per refused request instead of memory per queued one. Health stays open.
    Placed after :func:`body_deadline`: only complete requests count."""
    active = 0

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        nonlocal active
        if active >= limit and not request.path.startswith("/v2/health"):
            return error_response(503, f"too many concurrent requests (server.max_concurrent_requests = {limit})", headers={"Retry-After": "1"})
        active += 1
        try:
            return await handler(request)
        finally:
            active -= 1

    return middleware
