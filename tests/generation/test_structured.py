"""Structured output and tool calling, enforced, through unmodified clients: the ``openai``
package (``chat.completions.parse`` with a pydantic model, tools with a forced and a named
``tool_choice``, streamed tool calls), LangChain's ``ChatOpenAI`` (``with_structured_output``,
``bind_tools``) and the ``ollama`` package (``chat(format=schema)``, ``chat(tools=...)``),
against a live daemon serving the tiny causal LM in a real runner. The tiny model's answers are
nonsense; the constraint must hold anyway: every answer parses and validates. Then the hostile
cases: 4xx naming the field, or an honest finish reason, never a 5xx, and a running stream is
unaffected.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator, Literal

import aiohttp
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.appliance.test_api import check_against_spec
from tests.conftest import DaemonProc, start_tcp_daemon

MODEL = "tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false (what strict mode sends anyway)

    name: str = Field(max_length=12)
    country: Literal["France", "Italy", "Spain"]
    capital: bool
    population_millions: int = Field(ge=0, le=99)


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": TIME}}]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def served(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str, str]]:
    home = tmp_path_factory.mktemp("structured")
    store = home / "store"
    store.mkdir()
    shutil.copytree(tiny_lm, store / MODEL)
    token = secrets.token_hex(24)
    daemon, port = start_tcp_daemon(home / "d", store, token)
    try:
        status, body = _call(daemon, "POST", f"/v2/repository/models/{MODEL}/load",
                             {"parameters": {"engine": "deepspeed", "precision": "fp32", "max_num_seqs": 8}})
        assert status == 200, body
        yield daemon, f"http://127.0.0.1:{port}", token
    finally:
        daemon.stop()


def _call(daemon: DaemonProc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
            async with s.request(method, "http://localhost" + path, json=body) as resp:
                payload = await resp.read()
                check_against_spec(method, path, resp.status, resp.headers.get("Content-Type", ""), payload)
                try:
                    return resp.status, json.loads(payload)
                except ValueError:
                    return resp.status, payload

    return asyncio.run(go())


def _client(served) -> openai.OpenAI:
    _, base, token = served
    return openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0, timeout=120)


def _valid_call(name: str, arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, PARAMS[name])
    return args


# --- openai --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_parse_with_a_pydantic_model(served, temperature) -> None:
    reply = _client(served).chat.completions.parse(model=MODEL, messages=ASK, response_format=City,
                                                   max_tokens=120, temperature=temperature, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    City.model_validate_json(choice.message.content)


def test_openai_json_object(served) -> None:
    reply = _client(served).chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0.8,
                                                    response_format={"type": "json_object"})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"


def test_openai_tools_required_and_named(served) -> None:
    client = _client(served)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name in PARAMS
    _valid_call(call.function.name, call.function.arguments)

    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=1.0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    args = _valid_call("get_time", call.function.arguments)

    # the result goes back as a tool message after the assistant's call; the answer is text
    follow = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, tools=TOOLS, tool_choice="none", messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_time", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}])
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].finish_reason in ("stop", "length")


def test_openai_streamed_tool_call(served) -> None:
    stream = _client(served).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                     max_tokens=80, temperature=1.0, seed=7, stream=True)
    name, args, ids, finishes, deltas = None, "", set(), [], 0
    for chunk in stream:
        choice = chunk.choices[0]
        for tc in choice.delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
            if tc.function.name:
                name = tc.function.name
            if tc.function.arguments:
                args += tc.function.arguments
                deltas += 1
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"] and len(ids) == 1 and name in PARAMS
    assert deltas >= 2  # streamed as it was generated, not in one piece
    _valid_call(name, args)


def test_openai_tools_auto_is_text_or_a_valid_call(served) -> None:
    client = _client(served)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _valid_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    streamed = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0,
                                                   stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == [choice.finish_reason]
    if not choice.message.tool_calls:
        assert text == choice.message.content  # the same greedy answer, streamed


def test_a_schema_that_max_tokens_cuts_says_length(served) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 40}}, "required": ["s"]}
    reply = _client(served).chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0,
                                                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        _client(served).chat.completions.parse(model=MODEL, messages=ASK, response_format=City, max_tokens=3)


# --- LangChain -----------------------------------------------------------------------------


def _langchain(served, **kwargs):
    from langchain_openai import ChatOpenAI

    _, base, token = served
    return ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key=token, max_retries=0, timeout=120, **kwargs)


def test_langchain_with_structured_output(served) -> None:
    result = _langchain(served, temperature=0, max_tokens=120).with_structured_output(City).invoke("Tell me about Paris")
    assert isinstance(result, City)


def test_langchain_bind_tools(served) -> None:
    from langchain_core.tools import tool

    @tool
    def get_time(zone: Literal["utc", "cet"]) -> str:
        """The time in a zone."""
        return "12:00"

    llm = _langchain(served, temperature=0.7, max_tokens=60).bind_tools([get_time], tool_choice="get_time")
    msg = llm.invoke("What time is it?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("utc", "cet")


# --- ollama --------------------------------------------------------------------------------


def _ollama(served):
    import ollama

    _, base, token = served
    return ollama.Client(host=base, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def test_ollama_chat_with_a_format_schema(served) -> None:
    client = _ollama(served)
    reply = client.chat(model=MODEL, messages=ASK, format=City.model_json_schema(),
                        options={"temperature": 0, "num_predict": 120})
    assert reply.done_reason == "stop"
    City.model_validate_json(reply.message.content)
    streamed = "".join(part.message.content for part in client.chat(
        model=MODEL, messages=ASK, format="json", stream=True, options={"temperature": 0, "num_predict": 60}))
    json.loads(streamed)


def test_ollama_chat_with_tools(served) -> None:
    client = _ollama(served)
    # forced (Lastmile's options.tool_choice: Ollama has no tool_choice): a call in Ollama's shape.
    # (The ollama package drops maxLength from a tool's parameters, so the forced tool is the
    # one whose arguments are enums: a free string from the tiny model may run to num_predict.)
    for stream, choice in ((False, "get_time"), (True, "get_time"), (False, "required")):
        reply = client.chat(model=MODEL, messages=ASK, tools=TOOLS, stream=stream,
                            options={"temperature": 0.5, "num_predict": 80, "tool_choice": choice})
        last = list(reply)[-1] if stream else reply
        if choice == "required" and last.done_reason == "length":
            assert not last.message.tool_calls  # cut short: honestly no call
            continue
        assert last.done_reason == "stop"
        (call,) = last.message.tool_calls
        assert isinstance(call.function.arguments, dict)
        _valid_call(call.function.name, call.function.arguments)
    # the model decides: text, or a call that validates
    reply = client.chat(model=MODEL, messages=ASK, tools=TOOLS, options={"temperature": 0, "num_predict": 16})
    for call in reply.message.tool_calls or []:
        _valid_call(call.function.name, call.function.arguments)


# --- hostile -------------------------------------------------------------------------------


def _nested_defs(depth: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "integer"}
    schema: dict = {"$ref": "#/$defs/d0", "$defs": defs}
    inner: dict = {"type": "integer"}
    for _ in range(depth):
        inner = {"type": "object", "properties": {"x": inner}}
    return {"refs": schema, "nested": inner}


def _fmt(schema: Any) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def test_hostile_constraints_are_refused_or_honest(served) -> None:
    daemon = served[0]
    big = {"type": "object", "properties": {f"field_{i:05d}": {"type": "string", "description": "x" * 80} for i in range(1000)}}
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(1000)]
    deep = _nested_defs(60)
    cases = [
        ({"response_format": _fmt({"type": "frobnicate"})}, "response_format"),
        ({"response_format": _fmt({"$ref": "#/$defs/missing"})}, "response_format"),
        ({"response_format": _fmt(big)}, "response_format"),  # ~100 KB
        ({"response_format": _fmt(deep["nested"])}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": many, "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ]
    # a stream running meanwhile must finish untouched
    seen: dict[str, Any] = {}

    def running() -> None:
        s = _client(served).chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                                    stream=True, response_format={"type": "json_object"})
        chunks = list(s)
        seen["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    thread = threading.Thread(target=running)
    thread.start()
    for extra, field in cases:
        status, body = _call(daemon, "POST", "/v1/chat/completions",
                             {"model": MODEL, "messages": ASK, "max_tokens": 8, **extra})
        assert status == 400, (extra.keys(), status, body)
        assert body["error"]["param"] == field, body
    # deeply nested $defs (60 levels of $ref): refused, or enforced honestly
    status, body = _call(daemon, "POST", "/v1/chat/completions",
                         {"model": MODEL, "messages": ASK, "max_tokens": 8, "response_format": _fmt(deep["refs"])})
    assert status == 400 or (status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")), body
    # unsatisfiable: no value is both a string and an integer
    status, body = _call(daemon, "POST", "/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 8,
        "response_format": _fmt({"allOf": [{"type": "string"}, {"type": "integer"}]})})
    assert status == 400 or (status == 200 and body["choices"][0]["finish_reason"] != "stop"), body
    # Ollama's field names
    status, body = _call(daemon, "POST", "/api/chat", {"model": MODEL, "messages": ASK, "stream": False,
                                                        "format": {"type": "frobnicate"}})
    assert status == 400 and "format" in json.dumps(body), body
    status, body = _call(daemon, "POST", "/api/chat", {"model": MODEL, "messages": ASK, "stream": False, "tools": many})
    assert status == 400 and "tools" in json.dumps(body), body
    thread.join(120)
    assert seen["finish"] in (["stop"], ["length"])
    # a forced call and a schema answer, raw, as the OpenAPI document says
    status, body = _call(daemon, "POST", "/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 60, "tools": TOOLS, "tool_choice": "required", "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "tool_calls", body
    status, body = _call(daemon, "POST", "/api/chat", {"model": MODEL, "messages": ASK, "stream": False, "tools": TOOLS,
                                                        "options": {"tool_choice": "get_time", "temperature": 0}})
    assert status == 200 and body["message"]["tool_calls"][0]["function"]["name"] == "get_time", body


# --- the engines, in process: constrained and free sequences share a step ---------------------


@pytest.fixture(scope="module", params=["deepspeed", "ort-genai"])
def engine(request, tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "deepspeed":
        from lastmile.runtime.generation.torch_engine import TorchEngine

        eng = TorchEngine(tiny_lm, max_num_seqs=8, max_context=512, use_deepspeed=False)
    else:
        from lastmile.runtime.generation.ort_engine import OrtGenAIEngine

        folder = tmp_path_factory.mktemp("ort-structured") / "tiny"
        shutil.copytree(tiny_lm, folder)
        eng = OrtGenAIEngine.from_hf_folder(folder, precision="fp32", max_num_seqs=8, max_context=512)
    yield eng
    eng.close()


def _run(sched, reqs: dict, preempt_at: int | None = None) -> tuple[dict, dict]:
    for key, req in reqs.items():
        sched.submit(key, req)
    text = {k: "" for k in reqs}
    ids: dict = {k: [] for k in reqs}
    finish = {}
    steps = 0
    while sched.has_work():
        for key, chunk in sched.step():
            text[key] += chunk.text
            ids[key] += chunk.token_ids
            if chunk.finish_reason:
                finish[key] = chunk.finish_reason
        steps += 1
        if steps == preempt_at:
            sched.set_slots(2)  # the newest sequences leave the engine and come back by recompute
        if preempt_at and steps == preempt_at + 3:
            sched.set_slots(8)
    assert not sched.take_failures()
    return {k: (text[k], ids[k]) for k in reqs}, finish


def test_engines_mask_constrained_rows_and_leave_free_rows_alone(engine, tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    from lastmile.runtime.generation.scheduler import GenerationScheduler
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    schema = City.model_json_schema()
    free = {f"free{i}": GenerationRequest(SamplingParams(max_tokens=24, temperature=0.0), prompt="Hello " * (i + 1))
            for i in range(4)}
    alone, _ = _run(GenerationScheduler(engine, tok), free)
    constrained = {
        **{f"json{i}": GenerationRequest(SamplingParams(max_tokens=120, temperature=t, seed=i),
                                         messages=({"role": "user", "content": f"city {i}"},),
                                         constraint={"kind": "json_schema", "schema": schema, "field": "response_format"})
           for i, t in enumerate((0.0, 0.0, 0.8, 1.2))},
        "call": GenerationRequest(SamplingParams(max_tokens=80, temperature=0.0), messages=tuple(ASK),
                                  constraint={"kind": "tool_call", "field": "tools", "tools": [
                                      {"name": n, "parameters": p} for n, p in PARAMS.items()]}),
    }
    for preempt in (None, 4):
        sched = GenerationScheduler(engine, tok)
        got, finish = _run(sched, {**free, **constrained}, preempt_at=preempt)
        for key in free:  # greedy free rows: the same tokens as without constrained neighbours
            assert got[key][1] == alone[key][1], (preempt, key)
        for key in constrained:
            assert finish[key] == "stop", (preempt, key, got[key][0])
            value = json.loads(got[key][0])
            if key == "call":
                assert set(value) == {"name", "arguments"}
                _valid_call(value["name"], value["arguments"])
            else:
                City.model_validate(value)
        assert sched.stats()["constraint_cache_hits"] >= 3  # one compile per distinct constraint
