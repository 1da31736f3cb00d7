"""The generation APIs' body parsing (appliance/server/generate_params.py): what each wire
format accepts, and every bad field refused with its name. Pure functions, no daemon: the
same refusals over HTTP are checked in test_api_openai.py."""

from __future__ import annotations

from typing import Any

import pytest

from lastmile.appliance.server.generate_params import (
    MAX_CONTENT_CHARS, MAX_MESSAGES, MAX_STOP, ParamError, keep_alive_seconds, max_bytes_per_token, parse_chat,
    parse_completion, parse_ollama_generate, parse_ollama_preload, parse_triton,
)
from lastmile.runtime.generation.types import SEED_MAX, SEED_MIN, InvalidSamplingParams, SamplingParams

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "Once"}


def test_chat_defaults_and_every_supported_field() -> None:
    parsed = parse_chat(CHAT)
    assert parsed.model == "m" and not parsed.stream and not parsed.include_usage
    assert parsed.request.messages == ({"role": "user", "content": "hi"},)
    assert parsed.request.params == SamplingParams()
    parsed = parse_chat({**CHAT, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 42,
                         "stop": ["\n", "END", "\n"], "n": 1, "stream": True, "stream_options": {"include_usage": True},
                         "user": "me", "presence_penalty": 0, "logprobs": False, "timeout_s": 5})
    p = parsed.request.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (7, 0.0, 0.5, 3, 42, ("\n", "END"))
    assert parsed.stream and parsed.include_usage and parsed.request.deadline_s == 5.0


def test_chat_content_parts_developer_role_and_max_tokens_alias() -> None:
    parsed = parse_chat({"model": "m", "max_tokens": 9, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert parsed.request.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})
    assert parsed.request.params.max_tokens == 9
    both = parse_chat({**CHAT, "max_tokens": 9, "max_completion_tokens": 4})
    assert both.request.params.max_tokens == 4  # the current name wins over the deprecated one


def test_completion_prompt_forms() -> None:
    assert parse_completion(COMPLETION).request.prompt == "Once"
    assert parse_completion({**COMPLETION, "prompt": ["Once"]}).request.prompt == "Once"
    parsed = parse_completion({**COMPLETION, "prompt": [1, 2, 3]})
    assert parsed.request.prompt is None and parsed.request.prompt_token_ids == (1, 2, 3)
    assert parse_completion({**COMPLETION, "prompt": [[5, 6]]}).request.prompt_token_ids == (5, 6)
    assert parse_completion({**COMPLETION, "top_k": -1}).request.params.top_k == 0  # vLLM's "off"


BAD_CHAT: list[tuple[dict[str, Any], str]] = [
    ({"messages": CHAT["messages"]}, "model"),
    ({**CHAT, "model": ""}, "model"),
    ({**CHAT, "model": "x" * 300}, "model"),
    ({**CHAT, "model": 5}, "model"),
    ({"model": "m"}, "messages"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": "hi"}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]}, "messages"),
    ({**CHAT, "messages": ["hi"]}, "messages[0]"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": -3}, "max_tokens"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({**CHAT, "max_tokens": "10"}, "max_tokens"),
    ({**CHAT, "max_tokens": True}, "max_tokens"),
    ({**CHAT, "max_tokens": 10**9}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({**CHAT, "temperature": -0.1}, "temperature"),
    ({**CHAT, "temperature": 2.5}, "temperature"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": float("nan")}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "top_p": 1.5}, "top_p"),
    ({**CHAT, "top_k": -2}, "top_k"),
    ({**CHAT, "top_k": 0.5}, "top_k"),
    ({**CHAT, "seed": "s"}, "seed"),
    ({**CHAT, "seed": 2**70}, "seed"),
    ({**CHAT, "seed": 2**31}, "seed"),  # ORT-GenAI's random_seed is a C++ int32
    ({**CHAT, "seed": -(2**31) - 1}, "seed"),
    ({**CHAT, "top_p": 1e-300}, "top_p"),  # 0 in float32: every token masked, NaN
    ({**CHAT, "top_p": 5e-7}, "top_p"),
    ({**CHAT, "top_k": 1_000_001}, "top_k"),
    ({**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": "a", "name": "\ud800"}]}, "messages[0].name"),
    ({**CHAT, "stop": ["\ud800"]}, "stop"),
    ({**CHAT, "model": "m\ud800"}, "model"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "stop": [""]}, "stop"),
    ({**CHAT, "stop": ["x" * 257]}, "stop"),
    ({**CHAT, "stop": [str(i) for i in range(MAX_STOP + 1)]}, "stop"),
    ({**CHAT, "stop": [1]}, "stop"),
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "stream": True, "stream_options": []}, "stream_options"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({**CHAT, "stream": True, "stream_options": {"other": 1}}, "stream_options.other"),
    ({**CHAT, "logprobs": True}, "logprobs"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
    ({**CHAT, "tools": {"type": "function"}}, "tools"),
    ({**CHAT, "tool_choice": "required"}, "tool_choice"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, "response_format.json_schema.schema"),
    ({**CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ({**CHAT, "frequency_penalty": 1}, "frequency_penalty"),
    ({**CHAT, "logit_bias": {"1": 5}}, "logit_bias"),
    ({**CHAT, "user": 5}, "user"),
    ({**CHAT, "timeout_s": 0}, "timeout_s"),
    ({**CHAT, "timeout_s": 10**9}, "timeout_s"),
    ({**CHAT, "temperatur": 0.5}, "temperatur"),
]


BAD_COMPLETION: list[tuple[dict[str, Any], str]] = [
    ({"model": "m"}, "prompt"),
    ({**COMPLETION, "prompt": ""}, "prompt"),
    ({**COMPLETION, "prompt": ["a", "b"]}, "prompt"),
    ({**COMPLETION, "prompt": [1, -1]}, "prompt"),
    ({**COMPLETION, "prompt": [1, "a"]}, "prompt"),
    ({**COMPLETION, "prompt": {"text": "a"}}, "prompt"),
    ({**COMPLETION, "prompt": "x" * (MAX_CONTENT_CHARS + 1)}, "prompt"),
    ({**COMPLETION, "echo": True}, "echo"),
    ({**COMPLETION, "best_of": 3}, "best_of"),
    ({**COMPLETION, "logprobs": 2}, "logprobs"),
    ({**COMPLETION, "suffix": "end"}, "suffix"),
    ({**COMPLETION, "messages": []}, "messages"),
    ({**COMPLETION, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({**COMPLETION, "prompt": "\ud800"}, "prompt"),
]


BAD = [(parse_chat, body, field) for body, field in BAD_CHAT] + [(parse_completion, body, field) for body, field in BAD_COMPLETION]


@pytest.mark.parametrize("parse,body,field", BAD, ids=[f"{p.__name__}-{i}-{f}" for i, (p, _, f) in enumerate(BAD)])
def test_a_bad_field_is_named(parse: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ParamError) as info:
        parse(body)
    assert info.value.field == field, info.value.message
    assert info.value.message.startswith(info.value.field)


def test_triton_parameters_top_level_or_nested() -> None:
    nested = parse_triton({"text_input": "Hi", "parameters": {"max_tokens": 5, "temperature": 0, "stop": ["."]}}, "m", stream=False)
    top = parse_triton({"text_input": "Hi", "max_tokens": 5, "temperature": 0, "stop_words": ["."], "bad_words": ""}, "m", stream=False)
    assert nested.request == top.request and nested.request.prompt == "Hi"
    assert nested.request.params.max_tokens == 5 and nested.request.params.stop == (".",)
    assert parse_triton({"text_input": "Hi", "id": "r1", "parameters": {"stream": True}}, "m", stream=True).id == "r1"


BAD_TRITON: list[tuple[dict[str, Any], str]] = [
    ({}, "text_input"),
    ({"text_input": 5}, "text_input"),
    ({"text_input": "a", "parameters": []}, "parameters"),
    ({"text_input": "a", "parameters": {"max_tokens": 0}}, "parameters.max_tokens"),
    ({"text_input": "a", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ({"text_input": "a", "parameters": {"nope": 1}}, "parameters.nope"),
    ({"text_input": "a", "parameters": {"stream": True}}, "parameters.stream"),
    ({"text_input": "a", "max_tokens": 2, "parameters": {"max_tokens": 3}}, "parameters.max_tokens"),
    ({"text_input": "a", "top_p": 7}, "top_p"),
    ({"text_input": "a", "bad_words": ["x"]}, "bad_words"),
    ({"text_input": "a", "stop": ["x"], "stop_words": ["y"]}, "stop_words"),
    ({"text_input": "a", "id": 5}, "id"),
    ({"text_input": "a", "inputs": []}, "inputs"),
]


@pytest.mark.parametrize("body,field", BAD_TRITON, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_TRITON)])
def test_bad_triton_field_is_named(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_triton(body, "m", stream=False)
    assert info.value.field == field, info.value.message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v2/models/m/generate", "/v2/models/m/generate_stream",
                                  "/v2/models/m/versions/1/generate", "/v2/models/m/versions/1/generate_stream",
                                  "/api/chat", "/api/generate"])
def test_generation_is_viewer_allowed_like_infer(path: str) -> None:
    """Generating changes nothing in the daemon: viewers may do it (like V2 infer), and it is
    not audited as a state change; a made-up path next to them still needs an operator."""
    from aiohttp.test_utils import make_mocked_request

    from lastmile.appliance.server.auth import default_operator_required, default_state_changing

    request = make_mocked_request("POST", path)
    assert not default_operator_required(request) and not default_state_changing(request)
    assert default_operator_required(make_mocked_request("POST", path + "/x"))


def test_the_engines_bounds_are_accepted_at_their_edges() -> None:
    p = parse_chat({**CHAT, "seed": SEED_MAX, "top_p": 1e-6, "top_k": 1_000_000, "temperature": 2}).request.params
    assert (p.seed, p.top_p, p.top_k) == (2**31 - 1, 1e-6, 1_000_000)
    assert parse_chat({**CHAT, "seed": SEED_MIN}).request.params.seed == -(2**31)
    SamplingParams(top_k=512).validate(512)
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(top_k=513).validate(512)
    assert info.value.field == "top_k" and "512" in str(info.value)
    for bad in ({"temperature": float("inf")}, {"top_p": float("nan")}, {"seed": True}, {"max_tokens": True}):
        with pytest.raises(InvalidSamplingParams):
            SamplingParams(**bad).validate()


def test_prompt_bytes_and_api_prefixes_are_carried() -> None:
    assert parse_chat({**CHAT, "messages": [{"role": "user", "content": "é" * 3}]}).prompt_bytes == 6
    assert parse_completion({**COMPLETION, "prompt": "abc"}).prompt_bytes == 3
    assert parse_triton({"text_input": "Hi", "parameters": {"top_k": 2}}, "m", stream=False).param_prefix == "parameters."
    parsed = parse_ollama_generate({"model": "m", "prompt": "Hi", "system": "sys", "keep_alive": "5m"})
    assert parsed.prompt_bytes == 5 and parsed.param_prefix == "options." and parsed.keep_alive == 300.0


@pytest.mark.parametrize("value,seconds", [(0, 0.0), ("0", 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3),
                                           ("-1", -1.0), (-1, -1.0), ("10", 10.0), ("2m30s", 150.0)])
def test_ollama_keep_alive_durations(value: Any, seconds: float) -> None:
    assert keep_alive_seconds({"keep_alive": value}) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["x", "5q", "", "m", "inf", [], {}, True])
def test_bad_keep_alive_is_named(value: Any) -> None:
    with pytest.raises(ParamError) as info:
        parse_ollama_generate({"model": "m", "prompt": "Hi", "keep_alive": value})
    assert info.value.field == "keep_alive"


def test_ollama_preload_calls() -> None:
    assert parse_ollama_preload({"model": "m:latest"}, chat=False).model == "m"
    assert parse_ollama_preload({"model": "m", "prompt": ""}, chat=False).unload is False
    assert parse_ollama_preload({"model": "m", "keep_alive": 0}, chat=False).unload is True
    assert parse_ollama_preload({"model": "m", "messages": [], "keep_alive": "0"}, chat=True).unload is True
    assert parse_ollama_preload({"model": "m", "prompt": "Hi"}, chat=False) is None
    with pytest.raises(ParamError) as info:
        parse_ollama_preload({"model": "m", "bogus": 1}, chat=False)
    assert info.value.field == "bogus"


def _tokenizer(**over: Any) -> dict[str, Any]:
    base = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {"a": 0, "Ġthe": 1, "abcdef": 2}},
            "added_tokens": [{"content": "<|im_start|>"}]}
    return {**base, **over}


def test_bytes_per_token_bound() -> None:
    assert max_bytes_per_token(_tokenizer()) == len("<|im_start|>")
    # byte-level pieces count one byte per character ("Ġ" is a space: 2 bytes of UTF-8, 1 of the request)
    spaces = _tokenizer(model={"type": "BPE", "vocab": {"Ċ" + "Ġ" * 80: 0}}, added_tokens=[])
    assert max_bytes_per_token(spaces) == 81


def test_the_byte_level_alphabet_is_the_tokenizers_one() -> None:
    from tokenizers import pre_tokenizers

    from lastmile.appliance.server.generate_params import _BYTE_LEVEL

    assert _BYTE_LEVEL == frozenset(pre_tokenizers.ByteLevel.alphabet()) and len(_BYTE_LEVEL) == 256
    sentencepiece = _tokenizer(pre_tokenizer={"type": "Metaspace"}, added_tokens=[],
                               normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
                               model={"type": "BPE", "vocab": {"▁the": 0, "<0x41>": 1}, "byte_fallback": True})
    assert max_bytes_per_token(sentencepiece) == 6
    assert max_bytes_per_token(_tokenizer(normalizer={"type": "NFKC"})) == 4 * 12  # fullwidth letters fold 3:1
    # no bound where text can vanish or many characters become one token
    assert max_bytes_per_token(_tokenizer(normalizer={"type": "StripAccents"})) is None
    assert max_bytes_per_token(_tokenizer(pre_tokenizer={"type": "Whitespace"})) is None
    assert max_bytes_per_token(_tokenizer(pre_tokenizer={"type": "Metaspace"},
                                          model={"type": "BPE", "vocab": {"a": 0}, "fuse_unk": True})) is None
    assert max_bytes_per_token(_tokenizer(model={"type": "WordPiece", "vocab": {"a": 0}})) is None
    assert max_bytes_per_token(_tokenizer(model={"type": "Unigram", "vocab": [["▁a", 0.0]]})) is None
    assert max_bytes_per_token({"model": None}) is None


def test_the_bound_holds_for_a_real_byte_level_tokenizer(tmp_path) -> None:
    """Whatever the text, the tiny model's tokenizer never covers more bytes per token than the bound."""
    import json

    from tokenizers import Tokenizer

    from lastmile.runtime.generation.tiny import build_tiny_lm

    folder = build_tiny_lm(tmp_path / "tiny")
    bound = max_bytes_per_token(json.loads((folder / "tokenizer.json").read_text()))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ["The capital of France is Paris. " * 50, " " * 3000, "-" * 3000, "é😀" * 500, "<|im_start|>" * 100,
                 "\n" * 2000, "Lastmile is an edge inference appliance." * 20]:
        n = len(tok.encode(text).ids)
        assert n >= -(-len(text.encode()) // bound), (text[:20], n, bound)


# --- properties: hostile values never get past the parsers, nor raise anything but ParamError ---

def _hostile_values():
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=8)
    surrogate = st.sampled_from(["\ud800", "a\udfff", "\udbff\udc00x", "😀\ud83d"])
    number = st.one_of(st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([2**31, 2**31 - 1, -(2**31), -(2**31) - 1, 1e-300, 1e-40, 5e-7, 1e-6, 10**6, 10**6 + 1]))
    return st.one_of(number, text, surrogate, st.booleans(), st.none(), st.lists(st.one_of(text, surrogate), max_size=3))


def test_hostile_values_are_param_errors_or_within_every_engines_bounds() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "timeout_s", "model"]
    parsers = [
        lambda extra: parse_chat({**CHAT, **extra}),
        lambda extra: parse_chat({**CHAT, "messages": [{"role": "user", "content": extra.get("model", "hi")}], **{k: v for k, v in extra.items() if k != "model"}}),
        lambda extra: parse_completion({**COMPLETION, **extra}),
        lambda extra: parse_triton({"text_input": extra.pop("model", "Hi"), "parameters": extra}, "m", stream=False),
        lambda extra: parse_ollama_generate({"model": "m", "prompt": extra.pop("model", "Hi"), "options": {
            ("num_predict" if k == "max_tokens" else k): v for k, v in extra.items() if k != "timeout_s"}}),
    ]

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(range(len(parsers))), st.dictionaries(st.sampled_from(fields), _hostile_values(), max_size=4))
    def prop(which: int, extra: dict[str, Any]) -> None:
        try:
            parsed = parsers[which](dict(extra))
        except ParamError as exc:
            assert exc.field and exc.message.startswith(exc.field)
            return
        p = parsed.request.params
        p.validate(512)  if p.top_k <= 512 else p.validate()
        assert p.seed is None or SEED_MIN <= p.seed <= SEED_MAX
        assert 1e-6 <= p.top_p <= 1 and 0 <= p.temperature <= 2
        for text in [parsed.model, parsed.request.prompt or "", *p.stop,
                     *(m["content"] for m in parsed.request.messages or ())]:
            text.encode("utf-8")  # the tokenizer gets nothing it cannot encode

    prop()


def test_read_json_refuses_huge_integers_and_bad_bytes() -> None:
    import asyncio

    from aiohttp.test_utils import make_mocked_request

    from lastmile.appliance.server.http import ApiError, read_json

    async def read(payload: bytes) -> Any:
        request = make_mocked_request("POST", "/v1/completions")
        async def body() -> bytes:
            return payload
        request.read = body  # type: ignore[method-assign]
        return await read_json(request)

    for payload in (b'{"max_tokens": ' + b"9" * 5000 + b"}", b'{"a": "\xff"}', b"[" * 100_000, b'{"a": 1'):
        with pytest.raises(ApiError) as info:
            asyncio.run(read(payload))
        assert info.value.status == 400
    assert asyncio.run(read(b'{"a": "\\ud800"}')) == {"a": "\ud800"}  # valid JSON: the parsers refuse it, naming the field
