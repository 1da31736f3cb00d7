"""KServe V2 gRPC (``inference.GRPCInferenceService``) on the daemon's event loop.

The servicer is a thin route family like ``routes_v2.py``: each RPC turns its message into
the V2 request the data plane takes (``app["dataplane"]``), so answers equal HTTP's, and
maps the errors of the rooms below through ``http.to_api_error`` to gRPC status codes
(400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE, 507/429 RESOURCE_EXHAUSTED,
401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 504 DEADLINE_EXCEEDED; INTERNAL only for a bug).

Listeners (``server.grpc_socket``, ``server.grpc_port``):

* a Unix socket, always. gRPC does not hand a Python servicer the peer's credentials
  (``context.peer()`` is ``unix:PATH``, the same for every peer), so the socket file itself is
  the boundary: mode 0600 owned by the daemon's user, or 0660 with the group of the first
  ``auth.operator_groups`` entry that exists. Everyone who can connect is, by HTTP's rules, an
  operator (root, the daemon's uid, a member of an operator group); viewers use HTTP.
* TCP when ``server.grpc_port`` is set, on ``server.tcp_host``, with HTTP's rules: every RPC
  but ServerLive/ServerReady needs ``authorization: Bearer <token>`` metadata (the token of
  ``server.token_file``, checked by ``AuthPolicy.token_matches``, repeated failures slowed by
  ``TokenFailures``), TLS with ``server.tls_cert``/``tls_key``, and plain text only on loopback
  unless ``server.allow_insecure_tcp``.

Limits: a message over ``server.max_body_mb`` is refused by gRPC (RESOURCE_EXHAUSTED), an
answer over ``server.max_response_mb`` is INVALID_ARGUMENT (HTTP's 400), at most
``server.max_concurrent_requests`` RPCs run at once (RESOURCE_EXHAUSTED beyond), and the
client's deadline bounds the infer (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from lastmile.appliance.logs import log
from lastmile.appliance.server.auth import AuthPolicy, TokenFailures, load_token
from lastmile.appliance.server.grpc import inference_pb2 as pb
from lastmile.appliance.server.grpc import inference_pb2_grpc as pb_grpc
from lastmile.appliance.server.http import ApiError, to_api_error
from lastmile.appliance.v2codec import BadRequest, ResponseTooLarge

logger = logging.getLogger("lastmile.grpc")

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,  # the request cannot run on this model (HTTP's 422)
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_OPEN_RPCS = {"ServerLive", "ServerReady"}  # HTTP's /v2/health/*: no token needed over TCP
# the typed contents field of each V2 datatype (Triton: FP16/BF16 only as raw contents)
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def grpc_socket_path(config: Any) -> Path:
    """``server.grpc_socket``, or ``lastmile-grpc.sock`` beside the HTTP socket."""
    return config.server.get("grpc_socket") or config.socket_path.with_name("lastmile-grpc.sock")


def _param_value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _set_param(target: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        target[key].int64_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    else:
        target[key].string_param = str(value)


def _bytes_elements(items: Any) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def to_v2(request: Any) -> tuple[dict[str, Any], bytes]:
    """A ModelInferRequest as the V2 JSON header and binary part HTTP's route decodes: raw
    contents become binary tensors, typed contents JSON ``data`` (BYTES: binary elements)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; give one per input", "raw_input_contents")
    tensors, chunks = [], []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = {k: _param_value(v) for k, v in tensor.parameters.items()}
        if raw:
            params["binary_data_size"] = len(raw[i])
            chunks.append(raw[i])
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise BadRequest(f"{tensor.datatype or 'no datatype'} has no typed contents; send it in raw_input_contents",
                                 f"inputs[{i}].contents")
            values = getattr(tensor.contents, field)
            if tensor.datatype == "BYTES":
                blob = _bytes_elements(values)
                params["binary_data_size"] = len(blob)
                chunks.append(blob)
            else:
                entry["data"] = list(values)
        if params:
            entry["parameters"] = params
        tensors.append(entry)
    header: dict[str, Any] = {"inputs": tensors}
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    if request.id:
        header["id"] = request.id
    params = {k: _param_value(v) for k, v in request.parameters.items()}
    params["binary_data_output"] = True
    header["parameters"] = params
    return header, b"".join(chunks)


def _split_bytes(raw: bytes) -> list[bytes]:
    """BYTES elements of the binary form (a little-endian uint32 length before each)."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest("BYTES data ends inside an element's length", "raw_input_contents")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise BadRequest("BYTES element runs past the end of its data", "raw_input_contents")
        out.append(bytes(raw[offset:offset + n]))
        offset += n
    return out


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES" or array.dtype.kind in "OSU":
        return _bytes_elements(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: web.Application, policy: AuthPolicy, failures: TokenFailures) -> None:
        self.app, self.policy, self.failures = app, policy, failures
        self.plane = app["dataplane"]
        self.max_response = app["config"].server["max_response_mb"] * 1024 * 1024

    # --- who is asking ----------------------------------------------------------------------

    async def _check(self, context: Any, rpc: str) -> None:
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            return  # the socket file's mode is the boundary (module doc)
        if rpc in _OPEN_RPCS:
            return
        address = peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]")
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if header is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this RPC needs a bearer token over TCP: send metadata "
                                "'authorization: Bearer <token>' (the token is in the daemon's server.token_file)")
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() == "bearer" and presented.strip() and self.policy.token_matches(presented.strip()):
            self.failures.succeeded(address)
            return
        wait = self.failures.retry_after(address)
        if wait > 0:
            self.failures.locked_out(address)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many failed bearer-token attempts from {address}; "
                                f"try again in {int(wait) + 1} s")
        message = "invalid bearer token" if self.policy.token is not None else "TCP access has no token configured"
        self.failures.failed(address, f"grpc {rpc}: {message}")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def _fail(self, context: Any, exc: BaseException) -> None:
        mapped = to_api_error(exc)
        if mapped is None or mapped.status >= 500 and mapped.status not in STATUS:
            logger.exception("grpc: unexpected error", exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        where = f" (field {mapped.field})" if mapped.field else ""
        await context.abort(STATUS.get(mapped.status, grpc.StatusCode.UNKNOWN), f"{mapped.message}{where}")

    async def _call(self, context: Any, rpc: str, fn: Any) -> Any:
        await self._check(context, rpc)
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, a real bug to INTERNAL
            if type(exc).__name__ == "AbortError":  # context.abort inside fn
                raise
            await self._fail(context, exc)

    # --- health and metadata ------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return await self._call(context, "ServerLive", self._async(lambda: pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return await self._call(context, "ServerReady", self._async(lambda: pb.ServerReadyResponse(ready=self.plane.server_ready())))

    async def ModelReady(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            try:
                return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
            except ApiError as exc:
                if exc.status == 404:  # HTTP answers "not ready" with a status too; a name it does not serve is 404
                    raise
                return pb.ModelReadyResponse(ready=False)
        return await self._call(context, "ModelReady", self._async(answer))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            meta = self.plane.server_metadata()
            return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])
        return await self._call(context, "ServerMetadata", self._async(answer))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            meta = self.plane.model_metadata(request.name, request.version or None)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
            )
        return await self._call(context, "ModelMetadata", self._async(answer))

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        """Triton's model configuration as far as Lastmile has one: the tensors (without the
        batch dimension when the model batches), ``max_batch_size`` and the batcher's delay."""
        def answer() -> Any:
            model = self.plane.model(request.name, request.version or None)
            meta = self.plane.model_metadata(request.name, request.version or None)
            settings = model.settings
            tensors = [*meta["inputs"], *meta["outputs"]]
            batching = bool(tensors) and all(len(t["shape"]) >= 1 and t["shape"][0] == -1 for t in tensors)
            max_batch = int(getattr(settings, "max_batch_size", 0) or 0) if batching else 0
            dims = (lambda shape: list(shape[1:])) if max_batch else (lambda shape: list(shape))

            def dtype(name: str) -> int:
                key = "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"
                return pb.DataType.Value(key) if key in pb.DataType.keys() else pb.TYPE_INVALID

            config = pb.ModelConfig(name=meta["name"], platform=meta["platform"], backend=str(getattr(model, "backend", "")),
                                    max_batch_size=max_batch)
            for t in meta["inputs"]:
                config.input.add(name=t["name"], data_type=dtype(t["datatype"]), dims=dims(t["shape"]))
            for t in meta["outputs"]:
                config.output.add(name=t["name"], data_type=dtype(t["datatype"]), dims=dims(t["shape"]))
            if max_batch:
                delay_ms = float(getattr(settings, "max_delay_ms", 0.0) or 0.0)
                config.dynamic_batching.max_queue_delay_microseconds = int(delay_ms * 1000)
            return pb.ModelConfigResponse(config=config)
        return await self._call(context, "ModelConfig", self._async(answer))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Triton's statistics: one model, or every loaded model when ``name`` is empty."""
        def answer() -> Any:
            from google.protobuf import json_format

            if request.name:
                model = self.plane.model(request.name, request.version or None)
                rows = [model.counters.triton(model.name)]
            else:
                rows = [m.counters.triton(n) for n, m in sorted(self.app["daemon"].manager.models.items())]
            return json_format.ParseDict({"model_stats": rows}, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)
        return await self._call(context, "ModelStatistics", self._async(answer))

    @staticmethod
    def _async(fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return run

    # --- infer ----------------------------------------------------------------------------

    async def _infer(self, request: Any, context: Any) -> Any:
        plane = self.plane
        metrics = self.app.get("infer_metrics")
        name = request.model_name
        started = time.perf_counter()
        try:
            model = plane.model(name, request.model_version or None)
            header, binary = to_v2(request)
            remaining = context.time_remaining() if context is not None else None
            work = plane.infer(model, header, memoryview(binary))
            if remaining is not None:
                try:
                    result = await asyncio.wait_for(work, timeout=max(remaining, 0.0))
                except asyncio.TimeoutError:
                    raise ApiError(504, f"the client's deadline passed before {name!r} answered") from None
            else:
                result = await work
            response = self._encode(result, started)
        except Exception as exc:
            if metrics is not None:
                mapped = to_api_error(exc)
                metrics.failure(plane.metric_label(name), mapped.status if mapped is not None else 500, time.perf_counter() - started)
            raise
        if metrics is not None:
            metrics.success(result.model, time.perf_counter() - started, result.batch)
        return response

    def _encode(self, result: Any, started: float) -> Any:
        datatypes = {s.name: s.datatype for s in result.output_specs}
        names = result.request.requested_outputs or list(result.outputs)
        size = sum(result.outputs[n].nbytes for n in names)
        if size > self.max_response:
            mib = 1024 * 1024
            raise ResponseTooLarge(f"the response would be {size / mib:.1f} MiB, over the server's limit of "
                                   f"{self.max_response / mib:.0f} MiB (server.max_response_mb); send fewer rows", "outputs")
        response = pb.ModelInferResponse(model_name=result.model, model_version="1", id=result.request.id or "")
        for n in names:
            array = result.outputs[n]
            datatype = datatypes.get(n) or "FP32"
            response.outputs.add(name=n, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(_raw(array, datatype))
        batch = result.batch
        for key, value in (("batch_id", batch.batch_id), ("batch_size", batch.batch_size),
                           ("queue_ms", round(batch.queue_s * 1000, 3)), ("compute_ms", round(batch.compute_s * 1000, 3)),
                           ("total_ms", round((time.perf_counter() - started) * 1000, 3))):
            _set_param(response.parameters, key, value)
        return response

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._call(context, "ModelInfer", lambda: self._infer(request, context))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """Triton's bidirectional stream. A tensor model answers each request once, in order;
        a generation model (Triton's decoupled generate: a BYTES ``text_input``, sampling
        settings in ``parameters`` as in ``/v2/models/{name}/generate_stream``) answers with
        one ``text_output`` per chunk, the last one flagged ``triton_final_response`` and
        carrying ``finish_reason`` and the token counts. An error is an ``error_message`` in
        the stream (Triton's way) and the stream goes on. Requests of one stream are served
        one after another."""
        await self._check(context, "ModelStreamInfer")
        async for request in request_iterator:
            try:
                model = self.plane.model(request.model_name, request.model_version or None)
                if getattr(model, "generation", False):
                    async for answer in self._generate(request, model):
                        yield answer
                    continue
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                from lastmile.appliance.server.routes_generate import generation_api_error

                mapped = generation_api_error(exc)
                if mapped is None:
                    logger.exception("grpc stream: unexpected error", exc_info=exc)
                message = mapped.message if mapped is not None else f"internal error: {type(exc).__name__}"
                if mapped is not None and mapped.field:
                    message += f" (field {mapped.field})"
                yield pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, id=request.id))

    def _generate_body(self, request: Any) -> dict[str, Any]:
        """A ModelInferRequest for a generation model as the body of Triton's HTTP generate."""
        header, _ = to_v2(request)
        texts: list[bytes] = []
        for i, tensor in enumerate(request.inputs):
            if tensor.name == "stream":  # Triton's vLLM backend sends it; this RPC always streams
                continue
            if tensor.name != "text_input":
                raise BadRequest(f"input {tensor.name!r}: a generation model takes one BYTES input 'text_input' "
                                 "(sampling settings go in the request's parameters)", f"inputs[{i}].name")
            if tensor.datatype != "BYTES":
                raise BadRequest("text_input must be BYTES", f"inputs[{i}].datatype")
            raw = request.raw_input_contents[i] if request.raw_input_contents else _bytes_elements(tensor.contents.bytes_contents)
            texts = _split_bytes(raw)
        if len(texts) != 1:
            raise BadRequest(f"text_input must hold one element, got {len(texts)}", "inputs")
        try:
            text = texts[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("text_input is not UTF-8 text", "text_input") from None
        parameters = {k: v for k, v in header["parameters"].items() if k not in ("binary_data_output", "stream", "triton_enable_empty_final_response")}
        body: dict[str, Any] = {"text_input": text, "parameters": parameters}
        if request.id:
            body["id"] = request.id
        return body

    async def _generate(self, request: Any, model: Any) -> Any:
        from lastmile.appliance.server import routes_generate as gen

        name = model.name
        started = time.perf_counter()
        metrics = self.app[gen.GENERATION_METRICS]
        parsed = gen._parsed(gen.parse_triton, self._generate_body(request), name, stream=True)

        class _Shim:  # the part of a web.Request that the generation limits read
            app = self.app

        try:
            gen.check_request(parsed, await gen._limits(_Shim(), name, model), "triton")  # type: ignore[arg-type]
        except Exception:
            metrics.stream(name, "triton_grpc", started).end("bad_request")
            raise
        parsed, _timeout, _own = gen._deadlines(model, parsed)
        observer = metrics.stream(name, "triton_grpc", started)
        stream = self.app["daemon"].manager.generate(name, parsed.request)
        outcome = "error"
        try:
            while True:
                deadline = parsed.request.deadline_s
                try:
                    chunk = await asyncio.wait_for(gen._next(stream), timeout=deadline + gen.DEADLINE_GRACE_S) if deadline else await gen._next(stream)
                except asyncio.TimeoutError:
                    raise ApiError(504, f"model {name!r}: no token within the deadline") from None
                observer.chunk(time.perf_counter(), chunk.prompt_tokens, len(chunk.token_ids))
                if not chunk.text and chunk.finish_reason is None:
                    continue
                response = pb.ModelInferResponse(model_name=name, model_version="1", id=request.id)
                response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
                response.raw_output_contents.append(_bytes_elements([chunk.text.encode("utf-8")]))
                final = chunk.finish_reason is not None
                _set_param(response.parameters, "triton_final_response", final)
                if final:
                    _set_param(response.parameters, "finish_reason", chunk.finish_reason)
                    _set_param(response.parameters, "prompt_tokens", chunk.prompt_tokens)
                    _set_param(response.parameters, "completion_tokens", chunk.completion_tokens)
                yield pb.ModelStreamInferResponse(infer_response=response)
                if final:
                    outcome = "success"
                    return
        except ApiError as exc:
            outcome = gen._outcome(exc.status)
            raise
        except asyncio.CancelledError:
            outcome = "disconnected"
            raise
        finally:
            observer.end(outcome)
            await gen._close(stream)

    # --- Triton's repository extension ------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            rows = self.plane.repository_index(request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])
        return await self._call(context, "RepositoryIndex", self._async(answer))

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            parameters = {}
            for key, value in request.parameters.items():
                if key == "config":  # Triton's model config override: a JSON object of settings here
                    import json

                    try:
                        parameters.update(json.loads(value.string_param or "{}"))
                    except (ValueError, TypeError):
                        raise ApiError(400, "parameters.config must be a JSON object of settings", field="parameters.config") from None
                else:
                    parameters[key] = _param_value(value)
            await self.plane.load(request.model_name, parameters)
            return pb.RepositoryModelLoadResponse()
        return await self._call(context, "RepositoryModelLoad", run)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            await self.plane.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()
        return await self._call(context, "RepositoryModelUnload", run)


# --- the listeners -----------------------------------------------------------------------------


def _secure_socket(path: Path, operator_groups: list[Any]) -> None:
    """0600, or 0660 with the first operator group that exists (module doc)."""
    for entry in operator_groups:
        try:
            gid = int(entry) if isinstance(entry, int) or str(entry).isdigit() else grp.getgrnam(entry).gr_gid
            os.chown(path, -1, gid)
        except (KeyError, PermissionError, OSError):
            continue
        os.chmod(path, 0o660)
        return
    os.chmod(path, 0o600)


def _loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return all(ipaddress.ip_address(i[4][0].split("%", 1)[0]).is_loopback for i in infos)
    except (OSError, ValueError):
        return False


async def start_grpc(app: web.Application) -> grpc.aio.Server | None:
    """The gRPC server of ``app``'s daemon on its Unix socket (and TCP port), started; None
    when it has nothing to listen on (the default Unix path could not be bound: a warning)."""
    from lastmile.appliance.server.server import StartupError

    config = app["config"]
    server_cfg = config.server
    token = load_token(server_cfg["token_file"]) if server_cfg["token_file"] else None
    policy = AuthPolicy(operator_groups=config.auth["operator_groups"], operator_uids=config.auth["operator_uids"], token=token)
    options = [
        ("grpc.max_receive_message_length", server_cfg["max_body_mb"] * 1024 * 1024),
        ("grpc.max_send_message_length", server_cfg["max_response_mb"] * 1024 * 1024 + 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=server_cfg["max_concurrent_requests"])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app, policy, TokenFailures()), server)
    path = grpc_socket_path(config)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if path.exists() or path.is_symlink():
        from lastmile.appliance.server.server import bind_unix_socket

        bind_unix_socket(path).close()  # refuses a live daemon or a non-socket; removes a stale one
        path.unlink(missing_ok=True)
    where: list[str] = []
    old_umask = os.umask(0o177)  # born 0600: no window in which others may connect
    try:
        server.add_insecure_port(f"unix:{path}")
        where.append(f"unix:{path}")
    except RuntimeError as exc:
        reason = "its path is over 107 bytes" if len(str(path)) > 107 else str(exc).split(";", 1)[0]
        if server_cfg.get("grpc_socket"):  # asked for by name: the operator wants to know
            raise StartupError(f"server.grpc_socket: cannot bind {path}: {reason}") from None
        # the default beside the HTTP socket: HTTP serves on; say why gRPC does not
        log(logger, logging.WARNING, "gRPC Unix socket not bound; set server.grpc_socket to serve gRPC locally",
            socket=str(path), reason=reason)
    finally:
        os.umask(old_umask)
    port = server_cfg.get("grpc_port") or 0
    if port:
        host = server_cfg["tcp_host"]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if server_cfg["tls_cert"]:
                creds = grpc.ssl_server_credentials([(Path(server_cfg["tls_key"]).read_bytes(), Path(server_cfg["tls_cert"]).read_bytes())])
                bound = server.add_secure_port(address, creds)
            else:
                if not _loopback(host):
                    if not server_cfg["allow_insecure_tcp"]:
                        raise StartupError(
                            f"server.grpc_port: plain gRPC on {address} (not loopback) would send the bearer token in clear; "
                            "set server.tls_cert and server.tls_key, or listen on 127.0.0.1, or set server.allow_insecure_tcp = true")
                    log(logger, logging.WARNING, "plain gRPC on a non-loopback address: the bearer token crosses the network "
                        "in clear (server.allow_insecure_tcp = true)", socket=address)
                bound = server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            raise StartupError(f"server.grpc_port: cannot listen on {address}: {exc}") from None
        if not bound:
            raise StartupError(f"server.grpc_port: cannot listen on {address}")
        where.append(address)
    if not where:
        return None
    await server.start()
    if where[0].startswith("unix:"):
        _secure_socket(path, config.auth["operator_groups"])
    log(logger, logging.INFO, "grpc listening", sockets=",".join(where))
    return server


async def stop_grpc(server: grpc.aio.Server, config: Any, grace_s: float) -> None:
    await server.stop(grace_s)
    grpc_socket_path(config).unlink(missing_ok=True)
