"""Property tests for V2 tensor decoding and the binary tensor data extension
(appliance/v2codec.py).

The properties:

* round trip: any request a correct client can build (JSON flat or nested, or binary, mixed
  across inputs, any datatype, any shape the spec allows) decodes into exactly the arrays that
  were sent - same dtype, same shape, same bits;
* responses: ``encode_response`` output parsed as the extension says gives the arrays back;
* one mistake: a valid request with one thing broken raises :class:`BadRequest` naming the
  field that was broken;
* garbage: anything at all (random JSON shaped like a request, random bytes, random header
  lengths) either decodes into arrays that match the spec or raises ``BadRequest`` with a
  field - never another exception (which would be a 500).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from lastmile.appliance.v2codec import (
    HEADER_LENGTH, BadRequest, InferRequest, ResponseTooLarge, bf16_to_float, decode_request, decode_response, encode_response,
    response_bound, split_body,
)
from lastmile.models.spec import V2_TO_NUMPY, TensorSpec
from tests.fuzz._util import LONG, examples, run_property

pytestmark = pytest.mark.fuzz
DATATYPES = sorted(V2_TO_NUMPY)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


# --- strategies ---------------------------------------------------------------------------


def _values(datatype: str, count: int) -> st.SearchStrategy[np.ndarray]:
    """``count`` values a client may send for ``datatype`` (finite: JSON has no NaN/inf)."""
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        element = st.booleans()
    elif datatype == "BF16":
        # bfloat16 bit patterns that are finite numbers (exponent not all ones)
        element = st.integers(0, 0xFFFF).filter(lambda b: (b >> 7) & 0xFF != 0xFF)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        element = st.integers(int(info.min), int(info.max))
    else:
        element = st.floats(width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False)
    return st.lists(element, min_size=count, max_size=count).map(lambda v: np.array(v, dtype=dtype))


@dataclass
class Case:
    specs: tuple[TensorSpec, ...]
    arrays: dict[str, np.ndarray]
    binary: dict[str, bool]  # per input: sent with the binary extension?
    nested: dict[str, bool]  # per JSON input: nested lists rather than flat
    order: list[str]  # order of the inputs in the request
    outputs: list[str]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 3))
    names = draw(st.lists(NAMES, min_size=n, max_size=n, unique=True))
    batch = draw(st.integers(1, 3))
    specs, arrays = [], {}
    for name in names:
        datatype = draw(st.sampled_from(DATATYPES))
        dims = [batch] + draw(st.lists(st.integers(1, 4), max_size=2))
        spec_shape = tuple(-1 if i == 0 or draw(st.booleans()) else d for i, d in enumerate(dims))
        flat = draw(_values(datatype, math.prod(dims)))
        specs.append(TensorSpec(name, datatype, spec_shape))
        arrays[name] = flat.reshape(dims)
    order = draw(st.permutations(names))
    return Case(
        specs=tuple(specs),
        arrays=arrays,
        binary={n: draw(st.booleans()) for n in names},
        nested={n: draw(st.booleans()) for n in names},
        order=list(order),
        outputs=draw(st.lists(NAMES, min_size=1, max_size=3, unique=True)),
    )


def _json_values(array: np.ndarray, datatype: str, nested: bool) -> list[Any]:
    """What a client writes in ``data``: numbers (bfloat16 as the float it stands for)."""
    if datatype == "BF16":
        array = bf16_to_float(array)
    return array.tolist() if nested else array.reshape(-1).tolist()


def build_request(case: Case) -> tuple[dict[str, Any], bytes]:
    """The request header (a dict) and the binary part, as a client of the extension builds it."""
    by_name = {s.name: s for s in case.specs}
    tensors, chunks = [], []
    for name in case.order:
        array, spec = case.arrays[name], by_name[name]
        entry: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": list(array.shape)}
        if case.binary[name]:
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_values(array, spec.datatype, case.nested[name])
        tensors.append(entry)
    return {"inputs": tensors}, b"".join(chunks)


def encode_body(header: dict[str, Any], binary: bytes) -> tuple[bytes, str | None]:
    text = json.dumps(header).encode()
    return text + binary, (str(len(text)) if binary else None)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (got, want)  # bit for bit (-0.0, bf16 too)


# --- properties ---------------------------------------------------------------------------


def prop_round_trip(case: Case) -> None:
    header, binary = build_request(case)
    body, length = encode_body(header, binary)
    parsed, rest = split_body(body, length)
    decoded = decode_request(parsed, rest, case.specs, case.outputs)
    assert set(decoded.inputs) == set(case.arrays)
    for name, want in case.arrays.items():
        assert_same(decoded.inputs[name], want)
    assert decoded.requested_outputs is None and decoded.binary_outputs == set()


def prop_response_round_trip(args: tuple[Case, list[bool], bool]) -> None:
    case, binary_flags, all_binary = args
    outputs = {s.name: case.arrays[s.name] for s in case.specs}
    binary = {n for n, flag in zip(case.order, binary_flags) if flag}
    request = InferRequest(id="r", inputs={}, parameters={}, requested_outputs=list(case.order), binary_outputs=set(case.order) if all_binary else binary)
    body, headers = encode_response("m", request, outputs, case.specs, {"batch_size": 1})
    assert (HEADER_LENGTH in headers) == bool(request.binary_outputs)
    got, _ = decode_response(body, headers.get(HEADER_LENGTH))  # what the lastmile client reads
    assert list(got) == case.order
    for name in case.order:
        assert_same(got[name], outputs[name])


def prop_response_cap(args: tuple[Case, list[bool], int]) -> None:
    """``response_bound`` is never below the real size, and with ``max_bytes`` a
    response is either built within it or refused (``ResponseTooLarge`` naming ``outputs``)
    before it is built."""
    case, binary_flags, max_bytes = args
    outputs = {name: case.arrays[name] for name in case.order}
    binary = {n for n, flag in zip(case.order, binary_flags) if flag}
    request = InferRequest(id="r", inputs={}, parameters={}, requested_outputs=list(case.order), binary_outputs=binary)
    body, _ = encode_response("m", request, outputs, case.specs, {"batch_size": 1})
    bound = response_bound(request, outputs, {s.name: s.datatype for s in case.specs})
    assert len(body) <= bound, (len(body), bound)
    try:
        capped, _ = encode_response("m", request, outputs, case.specs, {"batch_size": 1}, max_bytes=max_bytes)
    except ResponseTooLarge as exc:
        assert exc.field == "outputs" and bound > max_bytes
        return
    assert capped == body and len(capped) <= max_bytes


# One mistake at a time: (what to break, the field the error must name).
MUTATIONS = [
    "fixed_dim", "extra_dim", "negative_dim", "shape_not_ints", "datatype", "unknown_name", "duplicate",
    "missing_input", "drop_value", "extra_value", "size_off", "trailing_bytes", "truncated_binary",
    "int_out_of_range", "float_for_int", "string_value", "batch_mismatch", "unknown_output", "id_not_string",
    "data_and_binary", "no_data", "bool_byte", "float_out_of_range",
    "repeated_output", "zero_dim", "huge_zero_batch",  # amplification, zero-size shapes
]


@st.composite
def broken(draw: st.DrawFn) -> tuple[Case, str]:
    case = draw(cases())
    return case, draw(st.sampled_from(MUTATIONS))


def _mutate(case: Case, mutation: str, draw_index: int) -> tuple[dict[str, Any], bytes, str | None] | None:
    """The request with one mistake, and the field its error must name (None: not applicable)."""
    header, binary = build_request(case)
    by_name = {s.name: s for s in case.specs}
    tensors = header["inputs"]
    i = draw_index % len(tensors)
    t, spec = tensors[i], by_name[tensors[i]["name"]]
    where = f"inputs[{i}]"
    binary_positions = [k for k, x in enumerate(tensors) if "parameters" in x]
    json_positions = [k for k, x in enumerate(tensors) if "data" in x]
    if mutation == "fixed_dim":
        fixed = [k for k, d in enumerate(spec.shape) if d != -1]
        if not fixed:
            return None
        t["shape"][fixed[0]] += 1
        return header, binary, f"{where}.shape"
    if mutation == "extra_dim":
        t["shape"].append(1)
        return header, binary, f"{where}.shape"
    if mutation == "negative_dim":
        t["shape"][-1] = -1
        return header, binary, f"{where}.shape"
    if mutation == "shape_not_ints":
        t["shape"][0] = float(t["shape"][0]) + 0.5
        return header, binary, f"{where}.shape"
    if mutation == "datatype":
        t["datatype"] = next(d for d in DATATYPES if d != spec.datatype)
        return header, binary, f"{where}.datatype"
    if mutation == "unknown_name":
        t["name"] = t["name"] + "\u2603"
        return header, binary, f"{where}.name"
    if mutation == "duplicate":
        if t.get("parameters"):
            return None
        tensors.append(dict(t))
        return header, binary, f"inputs[{len(tensors) - 1}].name"
    if mutation == "missing_input":
        if len(tensors) < 2 or t.get("parameters"):
            return None
        del tensors[i]
        return header, binary, "inputs"
    if mutation in ("drop_value", "extra_value"):
        if not json_positions:
            return None
        t = tensors[json_positions[0]]
        flat = np.asarray(_json_values(case.arrays[t["name"]], by_name[t["name"]].datatype, False), dtype=object).tolist()
        t["data"] = flat[:-1] if mutation == "drop_value" else flat + flat[:1]
        return header, binary, f"inputs[{json_positions[0]}].data"
    if mutation == "size_off":
        if not binary_positions:
            return None
        tensors[binary_positions[0]]["parameters"]["binary_data_size"] += 1
        return header, binary, f"inputs[{binary_positions[0]}].parameters.binary_data_size"
    if mutation == "trailing_bytes":
        if not binary_positions:
            return None
        return header, binary + b"\0", HEADER_LENGTH
    if mutation == "truncated_binary":
        if not binary_positions:
            return None
        return header, binary[:-1], f"inputs[{binary_positions[-1]}].parameters.binary_data_size"
    if mutation in ("int_out_of_range", "float_for_int", "string_value"):
        ints = [k for k in json_positions if V2_TO_NUMPY[tensors[k]["datatype"]].kind in "iu" and tensors[k]["datatype"] != "BF16"]
        targets = ints if mutation != "string_value" else json_positions
        if not targets:
            return None
        t = tensors[targets[0]]
        flat = list(np.asarray(t["data"], dtype=object).reshape(-1))
        dtype = V2_TO_NUMPY[t["datatype"]]
        flat[0] = int(np.iinfo(dtype).max) + 1 if mutation == "int_out_of_range" else 0.5 if mutation == "float_for_int" else "1"
        t["data"] = [v.item() if isinstance(v, np.generic) else v for v in flat]
        return header, binary, f"inputs[{targets[0]}].data"
    if mutation == "batch_mismatch":
        if len(tensors) < 2 or len(set(case.arrays[x["name"]].shape[0] for x in tensors)) != 1:
            return None
        j = json_positions[0] if json_positions else None
        if j is None:
            return None
        t = tensors[j]
        array = case.arrays[t["name"]]
        bigger = np.concatenate([array, array])
        t["shape"] = list(bigger.shape)
        t["data"] = _json_values(bigger, by_name[t["name"]].datatype, False)
        return header, binary, "inputs"
    if mutation == "unknown_output":
        header["outputs"] = [{"name": case.outputs[0] + "?"}]
        return header, binary, "outputs[0].name"
    if mutation == "id_not_string":
        header["id"] = 7
        return header, binary, "id"
    if mutation == "data_and_binary":
        if not binary_positions:
            return None
        tensors[binary_positions[0]]["data"] = [0]
        return header, binary, f"inputs[{binary_positions[0]}]"
    if mutation == "no_data":
        if i in binary_positions:
            return None  # removing a binary tensor's size shifts the others; covered by size_off
        del t["data"]
        return header, binary, f"{where}.data"
    if mutation == "float_out_of_range":
        narrow = [k for k in json_positions if tensors[k]["datatype"] in ("FP16", "FP32", "BF16")]
        if not narrow:
            return None
        t = tensors[narrow[0]]
        flat = [v for v in np.asarray(t["data"], dtype=object).reshape(-1)]
        flat[0] = 1e300  # finite in JSON, past the type's range: was silently inf
        t["data"] = flat
        return header, binary, f"inputs[{narrow[0]}].data"
    if mutation == "bool_byte":
        positions = [k for k in binary_positions if tensors[k]["datatype"] == "BOOL"]
        if not positions:
            return None
        k = positions[0]
        start = sum(tensors[m]["parameters"]["binary_data_size"] for m in binary_positions if m < k)
        raw = bytearray(binary)
        raw[start] = 2
        return header, bytes(raw), f"inputs[{k}]"
    if mutation == "repeated_output":
        if not case.outputs:
            return None
        header["outputs"] = [{"name": case.outputs[0]}] * (2 + draw_index)
        return header, binary, "outputs[1].name"
    if mutation in ("zero_dim", "huge_zero_batch"):
        # the shape is checked before the data: whatever data follows, the shape is to blame
        if mutation == "zero_dim":
            t["shape"][draw_index % len(t["shape"])] = 0
        elif len(t["shape"]) >= 2:
            t["shape"] = [2**62] + [0] * (len(t["shape"]) - 1)
        else:
            t["shape"] = [2**62]
        return header, binary, f"{where}.shape"
    raise AssertionError(mutation)


def prop_one_mistake(args: tuple[Case, str, int]) -> None:
    case, mutation, index = args
    broken_request = _mutate(case, mutation, index)
    if broken_request is None:
        return
    header, binary, field = broken_request
    body, length = encode_body(header, binary)
    if mutation == "trailing_bytes" or mutation == "truncated_binary":
        length = str(len(json.dumps(header).encode()))
    with pytest.raises(BadRequest) as info:
        parsed, rest = split_body(body, length)
        decode_request(parsed, rest, case.specs, case.outputs)
    assert info.value.field == field, (mutation, str(info.value), info.value.field, field)
    assert str(info.value), "the error says what is wrong"


# --- garbage ------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), NAMES,
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(NAMES, inner, max_size=4)), max_leaves=20)
GARBAGE_SPECS = (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT8", (-1,)), TensorSpec("c", "BOOL", (-1, -1)))


@st.composite
def garbage(draw: st.DrawFn) -> tuple[Any, bytes, str | None]:
    """Request-shaped JSON whose every part may be wrong, plus random binary and lengths."""
    def maybe(good: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(good, JSON)) if draw(st.booleans()) else draw(good)

    tensors = []
    for _ in range(draw(st.integers(0, 4))):
        tensor: dict[str, Any] = {}
        tensor["name"] = maybe(st.sampled_from(["a", "b", "c", "zz"]))
        for key, good in (
            ("datatype", st.sampled_from(DATATYPES)),
            ("shape", st.lists(st.integers(-2, 5) | st.integers(), max_size=3)),
            ("data", st.lists(SCALARS | st.lists(SCALARS, max_size=3), max_size=8)),
            ("parameters", st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 64) | st.integers()})),
        ):
            if draw(st.booleans()):
                tensor[key] = maybe(good)
        tensors.append(tensor if draw(st.integers(0, 9)) else draw(JSON))
    header: dict[str, Any] = {"inputs": tensors if draw(st.integers(0, 9)) else draw(JSON)}
    for key, good in (
        ("id", NAMES),
        ("parameters", st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans()})),
        ("outputs", st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "z", "q"])}, optional={"parameters": st.fixed_dictionaries({}, optional={"binary_data": st.booleans()})}), max_size=3)),
    ):
        if draw(st.booleans()):
            header[key] = maybe(good)
    binary = draw(st.binary(max_size=64))
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.none(), st.just(str(len(text))), st.integers(-3, len(text) + len(binary) + 3).map(str), NAMES))
    return header, binary, length


def prop_garbage(args: tuple[Any, bytes, str | None]) -> None:
    header, binary, length = args
    body = json.dumps(header).encode() + binary
    try:
        parsed, rest = split_body(body, length)
        decoded = decode_request(parsed, rest, GARBAGE_SPECS, ["y", "z"])
    except BadRequest as exc:
        # only a body that is not a JSON object at all has no one field to blame
        assert exc.field or str(exc).startswith(("body ", "JSON nested")), f"BadRequest without a field: {exc}"
        return
    by_name = {s.name: s for s in GARBAGE_SPECS}
    assert set(decoded.inputs) == set(by_name)
    for name, array in decoded.inputs.items():
        spec = by_name[name]
        assert array.dtype == V2_TO_NUMPY[spec.datatype]
        assert len(array.shape) == len(spec.shape) and all(w in (-1, g) for g, w in zip(array.shape, spec.shape))


def prop_any_bytes(args: tuple[bytes, str | None]) -> None:
    """split_body on arbitrary bytes: a dict header or BadRequest (never another exception)."""
    body, length = args
    try:
        header, rest = split_body(body, length)
    except BadRequest:
        return
    assert isinstance(header, dict)


# --- the tests: CI size in the default run, LONG times bigger behind ``slow`` --------------

SIZES = [pytest.param(1, id="ci"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("scale", SIZES)
def test_valid_requests_round_trip_exactly(scale: int) -> None:
    run_property(prop_round_trip, cases(), examples(150, scale))


@pytest.mark.parametrize("scale", SIZES)
def test_responses_round_trip(scale: int) -> None:
    strategy = cases().flatmap(lambda c: st.tuples(st.just(c), st.lists(st.booleans(), min_size=len(c.order), max_size=len(c.order)), st.booleans()))
    run_property(prop_response_round_trip, strategy, examples(100, scale))


@pytest.mark.parametrize("scale", SIZES)
def test_response_cap_is_an_upper_bound(scale: int) -> None:
    strategy = cases().flatmap(lambda c: st.tuples(st.just(c), st.lists(st.booleans(), min_size=len(c.order), max_size=len(c.order)),
                                                   st.integers(0, 4096)))
    run_property(prop_response_cap, strategy, examples(100, scale))


@pytest.mark.parametrize("scale", SIZES)
def test_one_mistake_names_its_field(scale: int) -> None:
    strategy = st.tuples(cases(), st.sampled_from(MUTATIONS), st.integers(0, 2))
    run_property(prop_one_mistake, strategy, examples(300, scale))


@pytest.mark.parametrize("scale", SIZES)
def test_garbage_is_bad_request_with_a_field_or_valid(scale: int) -> None:
    run_property(prop_garbage, garbage(), examples(200, scale))


@pytest.mark.parametrize("scale", SIZES)
def test_any_bytes_split_cleanly(scale: int) -> None:
    strategy = st.tuples(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()), st.none() | st.integers(-5, 300).map(str) | NAMES)
    run_property(prop_any_bytes, strategy, examples(200, scale))


def test_every_mutation_is_exercised() -> None:
    """Each kind of mistake applies to some valid request (else the property proves nothing)."""
    spec = (TensorSpec("a", "INT8", (-1, 2)), TensorSpec("b", "BOOL", (-1, 2)), TensorSpec("c", "FP32", (-1, 3)), TensorSpec("d", "FP16", (-1,)))
    case = Case(
        specs=spec,
        arrays={"a": np.array([[1, 2]], np.int8), "b": np.array([[True, False]]), "c": np.zeros((1, 3), np.float32), "d": np.ones(1, np.float16)},
        binary={"a": False, "b": True, "c": True, "d": False}, nested={"a": False, "b": False, "c": False, "d": False},
        order=["a", "b", "c", "d"], outputs=["y"],
    )
    for mutation in MUTATIONS:
        assert any(_mutate(case, mutation, i) is not None for i in range(3)), mutation
        for i in range(3):
            prop_one_mistake((case, mutation, i))


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b'{"a":' * 50_000 + b"1" + b"}" * 50_000],
    ids=["deep-array", "deep-inputs", "deep-object"],
)
def test_deeply_nested_json_is_a_bad_request(body: bytes) -> None:
    """json.loads raises RecursionError (not JSONDecodeError) past a few thousand levels; that
    too must be a bad request, not a 500."""
    with pytest.raises(BadRequest):
        split_body(body, None)
