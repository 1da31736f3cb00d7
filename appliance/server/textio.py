"""Text requests on the daemon's side: strings (or token ids) in, wire tensors to the runner,
embeddings / labels back out. Shared by V2 infer (``text`` BYTES tensors) and the OpenAI
``/v1/embeddings`` route, so both refuse the same bad inputs with the same words.

The daemon does not tokenize (the runner does, batched: :mod:`lastmile.runtime.backends.text`).
It checks what it can without a tokenizer: types, UTF-8, an empty list, a byte budget per text
(:attr:`lastmile.models.hf.HfFolder.text_bytes`, so no request makes it copy without bound),
and after the runner answered, the token count against the model's max length: a text longer
than that is a 400 with its token count unless the request asked to truncate.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastmile.appliance.v2codec import HEADER_LENGTH, BadRequest, input_tensors
from lastmile.models.hf import HfFolder, api_inputs, api_outputs
from lastmile.models.spec import Manifest, TensorSpec

__all__ = ["is_text_model", "public_specs", "TextBatch", "texts_to_wire", "ids_to_wire", "run_text",
           "decode_v2_text", "text_infer", "MAX_INPUTS"]

HIDDEN_FLAG = "output_hidden"  # see lastmile.runtime.backends.text
MAX_INPUTS = 2048  # texts per request (OpenAI's own limit for /v1/embeddings)


def is_text_model(manifest: Manifest) -> bool:
    """Served on the text path (mirrors :func:`lastmile.runtime.backends.text.is_text_manifest`,
    which lives in the runner room)."""
    from lastmile.models.hf import TEXT_TASKS, TOKEN_INPUT_NAMES

    hf = getattr(manifest, "hf", None)
    if hf is None or hf.task not in TEXT_TASKS:
        return False
    names = {s.name for s in manifest.inputs}
    return names == {"text_utf8", "text_len"} or {"input_ids", "attention_mask"} <= names <= set(TOKEN_INPUT_NAMES)


def public_specs(manifest: Manifest) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs/outputs callers see (V2 metadata, ``/lm/v1/models``): for a text model the
    derived ``text`` BYTES input and embeddings/labels outputs, else the manifest's own."""
    if is_text_model(manifest):
        return api_inputs(manifest.hf), api_outputs(manifest.hf)
    return manifest.inputs, manifest.outputs


@dataclass
class TextBatch:
    """One request's rows on their way to the runner, and where each came from (for errors)."""

    wire: dict[str, np.ndarray]
    fields: list[str]  # the request field naming each row, e.g. "inputs[0].data[2]" or "input[2]"
    truncate: bool
    hidden: bool = False


def _cut_utf8(raw: bytes, limit: int) -> bytes:
    """``raw`` cut to at most ``limit`` bytes at a character boundary."""
    cut = raw[:limit]
    return cut.decode("utf-8", errors="ignore").encode("utf-8")


def texts_to_wire(raws: list[bytes], hf: HfFolder, fields: list[str], truncate: bool, param_hint: str) -> TextBatch:
    """UTF-8 ``raws`` (already checked to decode) as the runner's ``text_utf8``/``text_len`` rows."""
    width = hf.text_bytes
    data = np.zeros((len(raws), width), dtype=np.uint8)
    lengths = np.zeros(len(raws), dtype=np.int32)
    for i, raw in enumerate(raws):
        if len(raw) > width:
            if not truncate:
                raise BadRequest(
                    f"text is {len(raw)} bytes; this model reads at most {width} bytes per text (max_length "
                    f"{hf.max_length} tokens); shorten it or set {param_hint} to cut it", fields[i])
            raw = _cut_utf8(raw, width)
        data[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        lengths[i] = len(raw)
    return TextBatch({"text_utf8": data, "text_len": lengths}, fields, truncate)


def ids_to_wire(rows: list[list[int]], masks: list[list[int]] | None, hf: HfFolder, fields: list[str],
                truncate: bool, param_hint: str, types: list[list[int]] | None = None) -> TextBatch:
    """Token-id rows (padded here with the folder's pad id, masked out) as the runner's inputs."""
    limit = hf.max_length or 512
    vocab = hf.vocab_size
    pad = hf.tokenizer.pad_id if hf.tokenizer and hf.tokenizer.pad_id is not None else 0
    left = bool(hf.tokenizer and hf.tokenizer.padding_side == "left")
    for i, row in enumerate(rows):
        if not row:
            raise BadRequest("a token-id list is empty", fields[i])
        if any(isinstance(t, bool) or not isinstance(t, int) for t in row):
            raise BadRequest("token ids must be integers", fields[i])
        if vocab and (min(row) < 0 or max(row) >= vocab):
            raise BadRequest(f"token ids must be in 0..{vocab - 1}", fields[i])
        if len(row) > limit and not truncate:
            raise BadRequest(f"{len(row)} tokens; this model takes at most {limit}; shorten it or set {param_hint} "
                             "to cut it", fields[i])
    width = min(max(len(r) for r in rows), limit)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[:width]
        m = (masks[i][: len(row)] if masks is not None else [1] * len(row))
        if left:
            ids[i, width - len(row):], mask[i, width - len(row):] = row, m
        else:
            ids[i, : len(row)], mask[i, : len(row)] = row, m
    wire = {"input_ids": ids, "attention_mask": mask}
    if types is not None:  # segment ids (BERT & co), padded with 0 where the ids are
        segments = np.zeros((len(rows), width), dtype=np.int64)
        for i, t in enumerate(types):
            t = t[: min(len(rows[i]), width)]
            if left:
                segments[i, width - len(t):] = t
            else:
                segments[i, : len(t)] = t
        wire["token_type_ids"] = segments
    return TextBatch(wire, fields, truncate)


async def run_text(manager: Any, model_name: str, hf: HfFolder, batch: TextBatch, max_batch_size: int,
                   param_hint: str) -> tuple[dict[str, np.ndarray], Any]:
    """Submit ``batch`` (split into chunks of ``max_batch_size`` rows, run side by side) and
    check every row's token count; returns the outputs concatenated and the first batch info."""
    wire = dict(batch.wire)
    if batch.hidden:
        wire[HIDDEN_FLAG] = np.ones(len(batch.fields), dtype=np.uint8)
    n = len(batch.fields)
    chunks = [{k: v[i: i + max_batch_size] for k, v in wire.items()} for i in range(0, n, max_batch_size)]
    results = await asyncio.gather(*(manager.infer(model_name, chunk) for chunk in chunks))
    outputs: dict[str, np.ndarray] = {}
    for key in results[0][0]:
        parts = [r[0][key] for r in results]
        if parts[0].ndim == 3 and len(parts) > 1:  # token-level: pad to the longest chunk
            width = max(p.shape[1] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in parts]
        outputs[key] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    limit = hf.max_length or 512
    counts = outputs["token_count"]
    if not batch.truncate:
        over = np.flatnonzero(counts > limit)
        if over.size:
            i = int(over[0])
            raise BadRequest(f"text has {int(counts[i])} tokens; this model takes at most {limit}; shorten it or "
                             f"set {param_hint} to cut it", batch.fields[i])
    outputs["token_count"] = np.minimum(counts, limit).astype(np.int32)
    return outputs, results[0][1]


# --- V2 ---------------------------------------------------------------------------------------


def _bytes_elements(raw: memoryview, count: int, where: str) -> list[bytes]:
    """The V2 binary BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise BadRequest("BYTES binary data ends before all elements were read", f"{where}.parameters.binary_data_size")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise BadRequest("a BYTES element runs past its tensor's binary data", f"{where}.parameters.binary_data_size")
        out.append(bytes(raw[offset: offset + n]))
        offset += n
    if offset != len(raw):
        raise BadRequest(f"{len(raw) - offset} bytes after the last BYTES element", f"{where}.parameters.binary_data_size")
    return out


def _truncate_param(header: dict[str, Any]) -> bool:
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object", "parameters")
    value = params.get("truncate", False)
    if not isinstance(value, bool):
        raise BadRequest(f"truncate must be true or false, got {value!r}", "parameters.truncate")
    return value


def decode_v2_text(header: dict[str, Any], binary: memoryview, manifest: Manifest) -> tuple[TextBatch, list[str] | None, set[str]]:
    """A V2 infer request for a text model: ``text`` BYTES ``[n]`` (JSON strings or binary), or
    ``input_ids`` INT64 ``[n, L]`` (+ ``attention_mask``, + ``token_type_ids`` for BERT & co). Returns the batch, the outputs asked
    for (None: the default ones) and those asked for as binary."""
    hf: HfFolder = manifest.hf
    hint = "parameters.truncate = true"
    truncate = _truncate_param(header)
    tensors: dict[str, tuple[str, dict[str, Any], memoryview | None]] = {}
    offset = 0
    for where, spec, tensor, params in input_tensors(header, api_inputs(hf), "this text model takes text or token ids:"):
        size = params.get("binary_data_size")
        chunk = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise BadRequest("binary_data_size must be a non-negative integer within the body", f"{where}.parameters.binary_data_size")
            chunk = binary[offset: offset + size]
            offset += size
        elif "data" not in tensor:
            raise BadRequest("tensor has no 'data' (and no binary_data_size)", f"{where}.data")
        tensors[spec.name] = (where, tensor, chunk)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input", HEADER_LENGTH)
    if ("text" in tensors) == ("input_ids" in tensors):
        raise BadRequest("send either 'text' (BYTES strings) or 'input_ids' (INT64 token ids), one of them", "inputs")
    if "text" in tensors and "token_type_ids" in tensors:
        raise BadRequest("token_type_ids go with input_ids; with text the model's tokenizer makes them",
                         f"{tensors['token_type_ids'][0]}.name")

    if "text" in tensors:
        where, tensor, chunk = tensors["text"]
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) \
                or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"shape must be [n] (or [n, 1]) for text, got {shape!r}", f"{where}.shape")
        count = shape[0]
        if count == 0:
            raise BadRequest("no texts: shape [0]", f"{where}.shape")
        if count > MAX_INPUTS:
            raise BadRequest(f"{count} texts; at most {MAX_INPUTS} per request", f"{where}.shape")
        if chunk is not None:
            raws = _bytes_elements(chunk, count, where)
        else:
            data = tensor["data"]
            if isinstance(data, list) and len(data) == count and all(isinstance(d, list) and len(d) == 1 for d in data):
                data = [d[0] for d in data]  # nested [[s], [s]] for shape [n, 1]
            if not isinstance(data, list) or len(data) != count:
                raise BadRequest(f"data must be a list of {count} strings", f"{where}.data")
            raws = []
            for j, value in enumerate(data):
                if not isinstance(value, str):
                    raise BadRequest(f"text must be a string, got {type(value).__name__}", f"{where}.data[{j}]")
                try:
                    raws.append(value.encode("utf-8"))
                except UnicodeEncodeError as exc:  # a lone surrogate escape ("\ud800") in the JSON
                    raise BadRequest(f"text is not valid Unicode: {exc.reason}", f"{where}.data[{j}]") from None
        fields = [f"{where}.data[{j}]" for j in range(count)]
        for j, raw in enumerate(raws):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"text is not UTF-8: byte {exc.start} ({raw[exc.start:exc.start + 1]!r})", fields[j]) from None
        if hf.tokenizer is None:
            raise BadRequest("this model folder has no tokenizer.json: send input_ids instead of text", f"{where}.name")
        batch = texts_to_wire(raws, hf, fields, truncate, hint)
    else:
        rows_arr = _ids_tensor(tensors["input_ids"])
        mask_arr = _ids_tensor(tensors["attention_mask"]) if "attention_mask" in tensors else None
        if mask_arr is not None and mask_arr.shape != rows_arr.shape:
            raise BadRequest(f"attention_mask shape {list(mask_arr.shape)} differs from input_ids {list(rows_arr.shape)}",
                             f"{tensors['attention_mask'][0]}.shape")
        where = tensors["input_ids"][0]
        fields = [f"{where}.data[{j}]" for j in range(rows_arr.shape[0])]
        rows = [r.tolist() for r in rows_arr]
        if mask_arr is not None and ((mask_arr != 0) & (mask_arr != 1)).any():
            raise BadRequest("attention_mask must hold 0 and 1", f"{tensors['attention_mask'][0]}.data")
        types_arr = _ids_tensor(tensors["token_type_ids"]) if "token_type_ids" in tensors else None
        if types_arr is not None:
            type_where = tensors["token_type_ids"][0]
            if types_arr.shape != rows_arr.shape:
                raise BadRequest(f"token_type_ids shape {list(types_arr.shape)} differs from input_ids {list(rows_arr.shape)}",
                                 f"{type_where}.shape")
            spec = next(t for t in api_inputs(hf) if t.name == "token_type_ids")
            if spec.range and ((types_arr < spec.range[0]) | (types_arr >= spec.range[1])).any():
                raise BadRequest(f"token_type_ids must be in {spec.range[0]}..{spec.range[1] - 1}", f"{type_where}.data")
        batch = ids_to_wire(rows, [m.tolist() for m in mask_arr] if mask_arr is not None else None, hf, fields, truncate, hint,
                            [t.tolist() for t in types_arr] if types_arr is not None else None)
    requested, binary_out = _requested(header, manifest)
    batch.hidden = requested is not None and "last_hidden_state" in requested
    return batch, requested, binary_out


def _ids_tensor(entry: tuple[str, dict[str, Any], memoryview | None]) -> np.ndarray:
    where, tensor, chunk = entry
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise BadRequest(f"shape must be [n, length] with both > 0, got {shape!r}", f"{where}.shape")
    if shape[0] > MAX_INPUTS:
        raise BadRequest(f"{shape[0]} rows; at most {MAX_INPUTS} per request", f"{where}.shape")
    count = shape[0] * shape[1]
    if chunk is not None:
        if len(chunk) != count * 8:
            raise BadRequest(f"binary_data_size is {len(chunk)} bytes; shape {shape} of INT64 needs {count * 8}",
                             f"{where}.parameters.binary_data_size")
        return np.frombuffer(chunk, dtype=np.int64).reshape(shape)
    try:
        array = np.asarray(tensor["data"])
        if array.size != count or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(f"need {count} integers")
        return array.astype(np.int64).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"data cannot be read as INT64 token ids: {exc}", f"{where}.data") from None


def _requested(header: dict[str, Any], manifest: Manifest) -> tuple[list[str] | None, set[str]]:
    names = [s.name for s in api_outputs(manifest.hf)]
    outputs = header.get("outputs")
    params = header.get("parameters") or {}
    all_binary = isinstance(params, dict) and params.get("binary_data_output") is True
    if outputs is None:
        default = [n for n in names if n != "last_hidden_state"]
        return None, set(default) if all_binary else set()
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list", "outputs")
    requested, binary = [], set()
    for i, out in enumerate(outputs):
        name = out.get("name") if isinstance(out, dict) else None
        if name not in names:
            raise BadRequest(f"unknown output {name!r}; the model's outputs are {names}", f"outputs[{i}].name")
        requested.append(name)
        p = out.get("parameters") or {}
        if all_binary or (isinstance(p, dict) and p.get("binary_data") is True):
            binary.add(name)
    return requested, binary


def api_results(hf: HfFolder, batch: TextBatch, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray | list]:
    """The runner's outputs as callers get them: labels from scores, token-level outputs cut to
    this request's own longest row (the batch may have been padded for a longer neighbour)."""
    counts = outputs["token_count"]
    longest = int(counts.max()) if counts.size else 0
    left = bool(hf.tokenizer and hf.tokenizer.padding_side == "left")

    def trim(a: np.ndarray) -> np.ndarray:
        return a[:, a.shape[1] - longest:] if left else a[:, :longest]

    result: dict[str, Any] = {"token_count": counts}
    if hf.task == "feature-extraction":
        result["embeddings"] = outputs["embeddings"]
        if "last_hidden_state" in outputs:
            result["last_hidden_state"] = np.ascontiguousarray(trim(outputs["last_hidden_state"]))
    else:
        scores, logits = outputs["scores"], outputs["logits"]
        if hf.task == "token-classification":
            scores, logits = trim(scores), trim(logits)
        top = scores.argmax(axis=-1)
        labels = np.asarray(hf.labels, dtype=object)[top]
        result.update(label=labels, scores=np.ascontiguousarray(scores), logits=np.ascontiguousarray(logits))
    return result


async def text_infer(manager: Any, model: Any, header: dict[str, Any], binary: memoryview) -> tuple[Any, dict[str, Any], tuple[TensorSpec, ...], Any]:
    """A V2 infer request for a text model, decoded, run and turned into the caller's outputs:
    ``(InferRequest, outputs, output specs, batch info)`` for the V2 route's encoder. ``label``
    (BYTES) always travels as JSON strings, even when binary outputs were asked for: the
    protocol lets the server choose per output, and the encoder's binary path is numeric."""
    from lastmile.appliance.v2codec import InferRequest

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string", "id")
    batch, requested, binary_out = decode_v2_text(header, binary, model.manifest)
    hf = model.manifest.hf
    outputs, info = await run_text(manager, model.name, hf, batch, model.settings.max_batch_size,
                                   "parameters.truncate = true")
    results = api_results(hf, batch, outputs)
    specs = api_outputs(hf)
    bytes_outputs = {s.name for s in specs if s.datatype == "BYTES"}
    names = requested or [s.name for s in specs if s.name in results]
    params = header.get("parameters") or {}
    request = InferRequest(request_id, {}, params, names, set(binary_out) - bytes_outputs)
    return request, {n: results[n] for n in names}, specs, info
