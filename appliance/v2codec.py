"""KServe Open Inference Protocol V2 tensors: decode a request against the model's input spec,
encode outputs, in JSON and with the binary tensor data extension.

Everything a client can get wrong is caught here, before a byte reaches a runner, and reported
as a :class:`BadRequest` that names the field (``inputs[1].shape``) and the problem.

JSON goes through orjson: it parses ~10x faster than ``json`` and writes NumPy arrays
natively (no Python float per element), which took a 1,024-float response from ~1 ms of
the event loop to ~40 µs. Floats are written as the shortest text that reads back to the
same value *of the tensor's own type* (``0.1`` for the float32 nearest 0.1, where
``json.dumps(tolist())`` wrote ``0.10000000149011612``): the same bits for any client that
reads them as the declared datatype. What orjson does not take the ``json`` module still
handles, unchanged: request bodies orjson refuses (integers past 64 bits, ``NaN`` literals,
nesting past 1,024 levels, invalid UTF-8) and outputs holding NaN or infinities (written as
``NaN``/``Infinity`` as before, not orjson's ``null``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import orjson

from lastmile.models.spec import V2_TO_NUMPY, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_DEPTH = 64
# Bounds checked before NumPy sees a shape: a dimension (and the element count) past these
# cannot be backed by any request body the daemon accepts, and NumPy would fail on them with
# an error of its own (a 500). Zero-size dimensions are refused outright: ``[2**62, 0]`` has no
# data to check against, so the batch dimension would reach the batcher unchecked.
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**31 - 1
# The most characters one element can take in a JSON response (its text plus the comma), per
# datatype: a response's size is bounded from these before it is built.
_JSON_CHARS = {"BOOL": 6, "INT8": 5, "UINT8": 4, "INT16": 7, "UINT16": 6, "INT32": 12, "UINT32": 11, "INT64": 21, "UINT64": 21}
_JSON_FLOAT_CHARS = 25  # repr of a double: "-2.2250738585072014e-308,"
_ENVELOPE_BYTES = 1024  # names, shapes and parameters around the data


class BadRequest(ValueError):
    """The request is malformed or does not match the model; maps to HTTP 400."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ResponseTooLarge(BadRequest):
    """The response would exceed ``server.max_response_mb``; refused before it is built (a
    client can ask for fewer rows, fewer outputs or binary outputs). Maps to HTTP 400."""


@dataclass
class InferRequest:
    """A decoded V2 request: validated input arrays plus what the client asked of the output."""

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    requested_outputs: list[str] | None  # None: all outputs
    binary_outputs: set[str] = field(default_factory=set)


def _check_depth(value: Any, depth: int = 0) -> None:
    """Deeply nested JSON costs recursion in every later step; refuse it early."""
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, (dict, list)):
                _check_depth(item, depth + 1)
    elif isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        for item in value:
            _check_depth(item, depth + 1)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary remainder (empty without the binary extension)."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}", HEADER_LENGTH) from None
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes", HEADER_LENGTH)
        json_part, binary = body[:n], memoryview(body)[n:]
    try:
        header = _loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads gives up past a few thousand levels of nesting
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(header, dict):
        raise BadRequest("body must be a JSON object")
    _check_depth(header)
    return header, binary


def _loads(text: bytes | memoryview) -> Any:
    """orjson, or ``json`` for what orjson refuses (see the module doc): the fallback keeps
    the old answers (a field-naming 400 for 2**64 as UINT64, NaN read as NaN) for bodies
    that are rare and never the fast path."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(bytes(text))


# dtypes orjson writes natively (OPT_SERIALIZE_NUMPY); anything else goes through tolist().
_NATIVE_KINDS = frozenset("biuf")


def _json_data(array: np.ndarray) -> Any:
    """A flat tensor as a value orjson writes without a Python object per element: the array
    itself when orjson can, else a list. ``None`` when it holds NaN or infinities (orjson
    would write ``null``), so the caller falls back to ``json``."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind not in _NATIVE_KINDS or flat.dtype.byteorder == ">":
        return flat.tolist()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return None
    return flat


def dumps(body: dict[str, Any]) -> bytes:
    """Compact JSON of a body whose tensors :func:`_json_data` prepared."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _dumps_plain(body: dict[str, Any]) -> bytes:
    """The ``json`` module's text (``NaN``/``Infinity`` kept) for bodies orjson cannot write."""
    def plain(value: Any) -> Any:
        return value.tolist() if isinstance(value, np.ndarray) else value

    for tensor in body.get("outputs", body.get("inputs", [])):
        if "data" in tensor:
            tensor["data"] = plain(tensor["data"])
    return json.dumps(body, separators=(",", ":")).encode()


def _bf16_from_float(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits, as uint16 (NumPy has no bfloat16)."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _check_shape(spec: TensorSpec, shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest("shape must be a list of integers", f"{where}.shape")
    if any(d < 0 for d in shape):
        raise BadRequest(f"shape {shape} has a negative dimension", f"{where}.shape")
    if any(d > MAX_DIM for d in shape):
        raise BadRequest(f"shape {shape} has a dimension larger than {MAX_DIM}", f"{where}.shape")
    if len(shape) != len(spec.shape):
        raise BadRequest(f"shape {shape} has {len(shape)} dimensions; {spec.name} expects {list(spec.shape)}", f"{where}.shape")
    for i, (got, want) in enumerate(zip(shape, spec.shape)):
        if want != -1 and got != want:
            raise BadRequest(f"shape {shape}: dimension {i} must be {want} (model expects {list(spec.shape)})", f"{where}.shape")
    if shape and shape[0] == 0:
        raise BadRequest("batch dimension is 0: nothing to infer", f"{where}.shape")
    if 0 in shape:
        raise BadRequest(f"shape {shape} has a dimension of 0: an empty tensor has nothing to infer", f"{where}.shape")
    if math.prod(shape) > MAX_ELEMENTS:
        raise BadRequest(f"shape {shape} has {math.prod(shape)} elements; at most {MAX_ELEMENTS} are accepted", f"{where}.shape")
    return tuple(shape)


def input_tensors(
    header: dict[str, Any], specs: Iterable[TensorSpec], known: str
) -> Iterator[tuple[str, TensorSpec, dict[str, Any], dict[str, Any]]]:
    """Each tensor of a V2 request's ``inputs`` as ``(where, spec, tensor, parameters)``, after
    the checks every decoder makes first: a non-empty list of objects, each naming a known input
    (``known`` introduces the list of names in the refusal) once, with the model's datatype."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors", "inputs")
    by_name = {s.name: s for s in specs}
    seen: set[str] = set()
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise BadRequest("each input must be a JSON object", where)
        name = tensor.get("name")
        spec = by_name.get(name) if isinstance(name, str) else None
        if spec is None:
            raise BadRequest(f"unknown input {name!r}; {known} {sorted(by_name)}", f"{where}.name")
        if name in seen:
            raise BadRequest(f"input {name!r} given twice", f"{where}.name")
        seen.add(name)
        datatype = tensor.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(f"datatype {datatype!r} does not match the model's {spec.datatype} for {name!r}", f"{where}.datatype")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("parameters must be an object", f"{where}.parameters")
        yield where, spec, tensor, params


def decode_request(
    header: dict[str, Any], binary: memoryview, specs: tuple[TensorSpec, ...], output_names: list[str]
) -> InferRequest:
    """Validate a V2 infer request against the model's inputs and build its arrays.

    Binary tensors are viewed in place in the request body (no copy); JSON data is converted
    once with NumPy.
    """
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for where, spec, tensor, params in input_tensors(header, specs, "the model's inputs are"):
        name, datatype = spec.name, spec.datatype
        shape = _check_shape(spec, tensor.get("shape"), where)
        count = math.prod(shape)
        dtype = V2_TO_NUMPY[datatype]
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise BadRequest("give either 'data' or parameters.binary_data_size, not both", where)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest("binary_data_size must be a non-negative integer", f"{where}.parameters.binary_data_size")
            if size != count * dtype.itemsize:
                raise BadRequest(
                    f"binary_data_size is {size} bytes but shape {list(shape)} of {datatype} needs {count * dtype.itemsize}",
                    f"{where}.parameters.binary_data_size",
                )
            if offset + size > len(binary):
                raise BadRequest(f"binary data for {name!r} runs past the end of the body", f"{where}.parameters.binary_data_size")
            array = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            if datatype == "BOOL" and size and np.frombuffer(binary[offset : offset + size], np.uint8).max() > 1:
                raise BadRequest("BOOL binary data must be bytes 0 or 1", where)
            offset += size
        else:
            if "data" not in tensor:
                raise BadRequest("tensor has no 'data' (and no binary_data_size)", f"{where}.data")
            array = _json_array(tensor["data"], datatype, dtype, count, shape, where)
        arrays[name] = array
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input", HEADER_LENGTH)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise BadRequest(f"missing input(s) {missing}", "inputs")
    batches = {a.shape[0] for a in arrays.values() if a.ndim}
    if len(batches) > 1:
        raise BadRequest(f"inputs disagree on the batch dimension: {sorted(batches)}", "inputs")

    requested, binary_outputs = _requested_outputs(header, output_names)
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string", "id")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object", "parameters")
    if parameters.get("binary_data_output") is True:
        binary_outputs = set(requested or output_names)
    return InferRequest(request_id, arrays, parameters, requested, binary_outputs)


def _json_array(data: Any, datatype: str, dtype: np.dtype, count: int, shape: tuple[int, ...], where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest("data must be a list (flat, row-major, or nested)", f"{where}.data")
    try:
        if datatype == "BOOL":
            flat = np.asarray(data, dtype=object).reshape(-1)
            if not all(isinstance(v, bool) for v in flat):
                raise ValueError("BOOL data must be true/false")
            array = flat.astype(np.bool_)
        elif dtype.kind in "iu" and datatype != "BF16":
            array = _json_ints(np.asarray(data), dtype, data)
        else:
            probe = np.asarray(data)
            if probe.size and probe.dtype.kind not in "biuf":
                raise ValueError("values must be numbers")
            with np.errstate(over="ignore", invalid="ignore"):
                wide = probe.astype(np.float32 if datatype == "BF16" else dtype)
                array = _bf16_from_float(wide) if datatype == "BF16" else wide
                overflow = np.isinf(bf16_to_float(array) if datatype == "BF16" else array) & ~np.isinf(probe.astype(np.float64))
            if overflow.any():
                raise ValueError(f"{probe.reshape(-1)[overflow.reshape(-1)][0]} is out of range for {datatype}")
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"data cannot be read as {datatype}: {exc}", f"{where}.data") from None
    if array.size != count:
        raise BadRequest(f"data has {array.size} elements but shape {list(shape)} needs {count}", f"{where}.data")
    return array.reshape(shape)


def _json_ints(probe: np.ndarray, dtype: np.dtype, data: list[Any]) -> np.ndarray:
    """Integers exactly, or ValueError: a value outside the datatype's range is refused rather
    than wrapped (300 as UINT8 is not 44). NumPy reads a list mixing values past int64 (UINT64)
    with others as float64 or objects: those are re-read as Python ints, exactly."""
    if probe.size == 0:
        return probe.astype(dtype)
    if probe.dtype.kind == "f":
        probe = np.asarray(data, dtype=object)
    if probe.dtype.kind == "O":
        flat = probe.reshape(-1)
        if not all(isinstance(v, int) for v in flat):
            raise ValueError("values must be integers")
    elif probe.dtype.kind not in "biu":
        raise ValueError("values must be integers")
    info = np.iinfo(dtype)
    low, high = int(probe.min()), int(probe.max())
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise ValueError(f"{bad} is out of range ({info.min} to {info.max})")
    return probe.astype(dtype) if probe.dtype.kind != "O" else np.array(probe.tolist(), dtype=dtype)


def _requested_outputs(header: dict[str, Any], names: list[str]) -> tuple[list[str] | None, set[str]]:
    outputs = header.get("outputs")
    if outputs is None:
        return None, set()
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list", "outputs")
    requested: list[str] = []
    binary: set[str] = set()
    for i, out in enumerate(outputs):
        name = out.get("name") if isinstance(out, dict) else None
        if name not in names:
            raise BadRequest(f"unknown output {name!r}; the model's outputs are {names}", f"outputs[{i}].name")
        if name in requested:
            # Each copy would be a full copy of the tensor in the response: N repeats, N times
            # the bytes (and the daemon's memory to build them). One is all a client needs.
            raise BadRequest(f"output {name!r} requested twice", f"outputs[{i}].name")
        requested.append(name)
        params = out.get("parameters") or {}
        if isinstance(params, dict) and params.get("binary_data") is True:
            binary.add(name)
    return requested, binary


def response_bound(request: InferRequest, outputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> int:
    """At most how many bytes :func:`encode_response` will produce: exact for binary outputs,
    the widest text per element for JSON ones. Cheap (shapes only), so it runs before a byte
    of the response exists."""
    total = _ENVELOPE_BYTES
    for name in request.requested_outputs or list(outputs):
        array = outputs[name]
        total += _ENVELOPE_BYTES
        if name in request.binary_outputs:
            total += array.nbytes
        else:
            datatype = datatypes.get(name) or _v2_datatype(array)
            total += array.size * _JSON_CHARS.get(datatype, _JSON_FLOAT_CHARS)
    return total


def encode_response(
    model_name: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    specs: tuple[TensorSpec, ...],
    extra: dict[str, Any],
    *,
    max_bytes: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Response body and headers; binary outputs follow the JSON header as the extension says.

    With ``max_bytes``, a response that could be larger is refused (:class:`ResponseTooLarge`)
    before it is built: building it is what costs the daemon memory and event-loop time."""
    datatypes = {s.name: s.datatype for s in specs}
    if max_bytes is not None:
        bound = response_bound(request, outputs, datatypes)
        if bound > max_bytes:
            mib = 1024 * 1024
            hint = "; binary outputs (parameters.binary_data_output = true) are smaller" if set(request.requested_outputs or outputs) - request.binary_outputs else ""
            raise ResponseTooLarge(
                f"the response would be up to {bound / mib:.1f} MiB, over the server's limit of {max_bytes / mib:.0f} MiB "
                f"(server.max_response_mb); send fewer rows or ask for fewer outputs{hint}",
                "outputs",
            )
    tensors, chunks = [], []
    plain = False
    for name in request.requested_outputs or list(outputs):
        array = outputs[name]
        datatype = datatypes.get(name) or _v2_datatype(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary_outputs:
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            data = _json_data(bf16_to_float(array) if datatype == "BF16" else array)
            if data is None:
                plain, data = True, np.asarray(array if datatype != "BF16" else bf16_to_float(array)).reshape(-1)
            entry["data"] = data
        tensors.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        body["id"] = request.id
    if extra:
        body["parameters"] = extra
    text = _dumps_plain(body) if plain else dumps(body)
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return b"".join([text, *chunks]), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def encode_request(inputs: dict[str, np.ndarray], datatypes: dict[str, str], *, binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """A client's V2 infer body and headers: the binary tensor extension both ways (no float
    text round trip), or plain JSON tensors."""
    tensors, chunks = [], []
    plain = False
    for name, array in inputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(array)
            plain = plain or entry["data"] is None
            if entry["data"] is None:
                entry["data"] = np.asarray(array).reshape(-1)
        tensors.append(entry)
    header: dict[str, Any] = {"inputs": tensors}
    if binary:
        header["parameters"] = {"binary_data_output": True}
    text = _dumps_plain(header) if plain else dumps(header)
    if binary:
        return text + b"".join(chunks), {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}
    return text, {"Content-Type": "application/json"}


def decode_response(payload: bytes, header_length: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A V2 infer response's outputs as arrays (binary ones viewed in place) and its parameters."""
    split = int(header_length) if header_length is not None else len(payload)
    body = _loads(payload[:split])
    outputs, offset = {}, split
    for out in body["outputs"]:
        dtype = V2_TO_NUMPY[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outputs[out["name"]] = np.frombuffer(payload, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(out["shape"])
            offset += size
        elif out["datatype"] == "BF16":  # JSON carries bfloat16 as numbers; the array holds its bits
            outputs[out["name"]] = _bf16_from_float(np.asarray(out["data"], np.float32)).reshape(out["shape"])
        else:
            outputs[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
    if offset != len(payload):
        raise ValueError(f"the response has {len(payload) - offset} bytes after its last binary output")
    return outputs, dict(body.get("parameters") or {})


def _v2_datatype(array: np.ndarray) -> str:
    from lastmile.models.spec import NUMPY_TO_V2

    return NUMPY_TO_V2.get(array.dtype, "FP32")
