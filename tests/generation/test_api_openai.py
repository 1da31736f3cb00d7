"""The generation API end to end: a real daemon serving the tiny causal LM in a real runner
process, called by real clients — the ``openai`` package over TCP (the token as api_key) and
over the Unix socket (httpx transport with ``uds``), aiohttp for raw SSE, and the
``lastmile`` CLI. The reference is ``transformers.generate`` (fp32 greedy) in this process.
Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import httpx2
import openai
import pytest

from tests.appliance.test_api import check_against_spec
from tests.conftest import ROOT, DaemonProc, start_tcp_daemon

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tiny_lm: Path, demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str, str]]:
    """A daemon with the tiny LM loaded, on its socket and on TCP with a token."""
    home = tmp_path_factory.mktemp("gen-api")
    store = home / "store"
    shutil.copytree(demo_store, store)
    shutil.copytree(tiny_lm, store / MODEL)
    token = secrets.token_hex(24)
    daemon, port = start_tcp_daemon(home / "d", store, token)
    try:
        # the DeepSpeed/torch engine at fp32: the correctness reference (ORT-GenAI int4, the CPU
        # default, is measured in the benchmark, not compared token for token)
        status, body = _call(daemon, "POST", f"/v2/repository/models/{MODEL}/load",
                             {"parameters": {"engine": "deepspeed", "precision": "fp32", "max_num_seqs": 8}})
        assert status == 200, body
        yield daemon, f"http://127.0.0.1:{port}/v1", token
    finally:
        daemon.stop()


def _call(daemon: DaemonProc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
            async with s.request(method, "http://localhost" + path, json=body) as resp:
                payload = await resp.read()
                if path.startswith(("/v1/", "/v2/models", "/api/")):
                    check_against_spec(method, path, resp.status, resp.headers.get("Content-Type", ""), payload)
                ctype = resp.headers.get("Content-Type", "")
                return resp.status, json.loads(payload) if ctype.startswith("application/json") else payload

    return asyncio.run(go())


@pytest.fixture(scope="module")
def reference(tiny_lm: Path):
    """Greedy text of ``transformers.generate`` for chat messages or a raw prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()

    def generate(*, messages: list[dict[str, str]] | None = None, prompt: str | None = None, max_tokens: int) -> tuple[str, int, int, str]:
        if messages is not None:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
        new = out[0, len(ids):].tolist()
        eos = model.generation_config.eos_token_id
        finished = eos in new
        if finished:
            new = new[:new.index(eos) + 1]
        text_out = tok.decode([t for t in new if t != eos], skip_special_tokens=True)
        return text_out, len(ids), len(new), "stop" if finished else "length"

    return generate


def _tcp_client(served: tuple[DaemonProc, str, str]) -> openai.OpenAI:
    _, base, token = served
    return openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=120)


def _uds_client(served: tuple[DaemonProc, str, str]) -> openai.OpenAI:
    daemon = served[0]
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused-on-the-socket", max_retries=0, timeout=120,
                         http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.socket))))


def test_openai_chat_over_tcp_equals_transformers_generate(served, reference) -> None:
    expected, prompt_tokens, n, finish = reference(messages=QUESTION, max_tokens=24)
    reply = _tcp_client(served).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == n
    assert reply.usage.total_tokens == prompt_tokens + n
    assert reply.choices[0].finish_reason == finish and reply.object == "chat.completion"


def test_openai_stream_over_the_unix_socket(served, reference) -> None:
    expected, prompt_tokens, n, finish = reference(messages=QUESTION, max_tokens=24)
    stream = _uds_client(served).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_and_eight_concurrent_prompts_equal_the_reference(served, reference) -> None:
    """Different prompt lengths, all at once: continuous batching must not change a token."""
    prompts = ["Hello" * i + " world, the capital of" for i in range(1, 9)]
    client = openai.AsyncOpenAI(base_url=served[1], api_key=served[2], max_retries=0, timeout=120)

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0) for p in prompts))

    replies = asyncio.run(all_at_once())
    for prompt, reply in zip(prompts, replies):
        expected, prompt_tokens, n, _ = reference(prompt=prompt, max_tokens=16)
        assert reply.choices[0].text == expected, prompt
        assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == n
        assert reply.object == "text_completion"


def test_stop_sequences_cut_the_text(served, reference) -> None:
    full, _, _, _ = reference(prompt="The capital of Italy is", max_tokens=24)
    words = [w for w in full.split(" ") if len(w) >= 2]
    assert len(words) >= 2, f"the reference text is too short to pick a stop string from: {full!r}"
    stop = words[1]
    cut = full[:full.index(stop)]
    client = _tcp_client(served)
    reply = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_a_deadline_cut_is_an_openai_finish_reason(served) -> None:
    """``timeout_s`` cuts the answer; OpenAI's clients get one of their own finish reasons
    ("length": cut short by a limit) and Lastmile's extra key says which limit."""
    client = _tcp_client(served)
    reply = client.completions.create(model=MODEL, prompt="Count: one two", max_tokens=400, temperature=0,
                                      extra_body={"timeout_s": 0.001})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.model_extra["lastmile_finish_reason"] == "timeout"
    assert reply.usage.completion_tokens < 400
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=400, temperature=0, stream=True,
                                            extra_body={"timeout_s": 0.001})
    last = [c.choices[0] for c in stream if c.choices and c.choices[0].finish_reason][-1]
    assert last.finish_reason == "length" and last.model_extra["lastmile_finish_reason"] == "timeout"


def test_context_overflow_is_400_with_the_counts(served) -> None:
    client = _tcp_client(served)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100_000)
    err = info.value.body
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
    assert err["max_tokens"] == 100_000 and err["prompt_tokens"] > 0 and err["max_context"] > 0
    assert str(err["max_context"]) in err["message"] and str(err["prompt_tokens"]) in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=" lastmile" * 5000, max_tokens=4)
    assert info.value.param == "prompt" and info.value.body["prompt_tokens"] > info.value.body["max_context"]


@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"), ({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"), ({"logprobs": True}, "logprobs"), ({"extra_body": {"top_k": "x"}}, "top_k"),
    ({"extra_body": {"nonsense": 1}}, "nonsense"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "nope"}, "model"), ({"model": "demo-mlp"}, "model"),
])
def test_every_bad_field_is_a_4xx_naming_it(served, extra: dict[str, Any], param: str) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": QUESTION, **extra}
    if extra.get("model") == "demo-mlp":
        assert _call(served[0], "POST", "/v2/repository/models/demo-mlp/load", {})[0] == 200
    with pytest.raises(openai.APIStatusError) as info:
        _tcp_client(served).chat.completions.create(**kwargs)
    assert info.value.status_code == (404 if extra.get("model") == "nope" else 400)
    assert info.value.param == param, info.value.body
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["message"]


def test_raw_refusals_match_the_openapi_document(served) -> None:
    daemon = served[0]
    for body, status in (({"model": MODEL}, 400), ({"model": "nope", "messages": QUESTION}, 404), ({"model": MODEL, "messages": QUESTION, "max_tokens": 2}, 200)):
        got, payload = _call(daemon, "POST", "/v1/chat/completions", body)
        assert got == status, payload
    got, payload = _call(daemon, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert got == 200 and payload["usage"]["completion_tokens"] <= 2


def test_triton_generate_and_generate_stream(served, reference) -> None:
    daemon = served[0]
    expected, prompt_tokens, n, _ = reference(prompt="The capital of Spain is", max_tokens=12)
    status, body = _call(daemon, "POST", f"/v2/models/{MODEL}/generate",
                         {"text_input": "The capital of Spain is", "parameters": {"max_tokens": 12, "temperature": 0}})
    assert status == 200 and body["text_output"] == expected and body["model_name"] == MODEL
    assert body["completion_tokens"] == n and body["prompt_tokens"] == prompt_tokens
    status, raw = _call(daemon, "POST", f"/v2/models/{MODEL}/versions/1/generate_stream",
                        {"text_input": "The capital of Spain is", "max_tokens": 12, "temperature": 0, "id": "r7"})
    events = [json.loads(line[5:]) for line in raw.decode().split("\n\n") if line.startswith("data:")]
    assert status == 200 and "".join(e["text_output"] for e in events) == expected
    assert all(e["id"] == "r7" for e in events) and events[-1]["finish_reason"] in ("stop", "length")
    status, body = _call(daemon, "POST", f"/v2/models/{MODEL}/generate", {"text_input": "x", "parameters": {"top_k": -5}})
    assert status == 400 and body["field"] == "parameters.top_k"
    status, body = _call(daemon, "POST", f"/v2/models/{MODEL}/generate", {"text_input": "x", "max_tokens": 100_000})
    assert status == 400 and body["field"] == "max_tokens" and body["max_context"] > 0


def _generation(daemon: DaemonProc) -> dict[str, Any]:
    return _call(daemon, "GET", f"/lm/v1/models/{MODEL}")[1]["generation"]


def test_a_client_that_disconnects_frees_its_slot(served) -> None:
    daemon = served[0]

    async def open_then_leave() -> int:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
            resp = await s.post("http://localhost/v1/completions", json={
                "model": MODEL, "prompt": "Hello", "max_tokens": 1500, "temperature": 0, "stream": True})
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")  # the stream is running
            running = await _running_while(daemon)
            resp.close()  # the client goes away mid-stream
            return running

    running = asyncio.run(open_then_leave())
    assert running >= 1
    deadline = time.monotonic() + 10
    while _generation(daemon)["running"] != 0:
        assert time.monotonic() < deadline, f"the slot was not freed: {_generation(daemon)}"
        time.sleep(0.1)
    gen = _generation(daemon)
    assert gen["kv_used_bytes"] == 0 and gen["waiting"] == 0


async def _running_while(daemon: DaemonProc) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
        for _ in range(50):
            async with s.get(f"http://localhost/lm/v1/models/{MODEL}") as r:
                running = (await r.json())["generation"]["running"]
            if running:
                return running
            await asyncio.sleep(0.05)
    return 0


def test_metrics_and_monitor_show_generation(served) -> None:
    daemon = served[0]
    _tcp_client(served).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    status, raw = _call(daemon, "GET", "/metrics")
    text = raw.decode() if isinstance(raw, bytes) else raw
    for name in ("lastmile_generation_ttft_seconds_count", "lastmile_generation_inter_token_seconds_count",
                 "lastmile_generation_tokens_total", "lastmile_generation_prompt_tokens_total",
                 "lastmile_generation_running", "lastmile_generation_kv_reserved_bytes", "lastmile_generation_slots"):
        line = next((ln for ln in text.splitlines() if ln.startswith(name) and f'model="{MODEL}"' in ln), None)
        assert line is not None, f"{name} missing"
    ttft = next(ln for ln in text.splitlines() if ln.startswith("lastmile_generation_ttft_seconds_count") and MODEL in ln)
    assert float(ttft.split()[-1]) >= 1
    requests = [ln for ln in text.splitlines() if ln.startswith("lastmile_generation_requests_total") and 'outcome="success"' in ln]
    assert requests

    async def rows_while_generating() -> list[dict[str, Any]]:
        """Monitor rows of the model over the ticks during and right after one generation."""
        rows = []
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
            async with s.ws_connect("http://localhost/lm/v1/monitor?rate_hz=10") as ws:
                await ws.receive_json()
                call = asyncio.create_task(asyncio.to_thread(
                    _tcp_client(served).chat.completions.create, model=MODEL, messages=QUESTION, max_tokens=64, temperature=0))
                while not call.done() or len(rows) < 3:
                    snap = await ws.receive_json()
                    rows.append(next(r for r in snap["models"] if r["name"] == MODEL))
                    if len(rows) > 200:
                        break
                await call
        return rows

    rows = asyncio.run(rows_while_generating())
    api = rows[-1]["generation"]["api"]
    assert api["generated_tokens_total"] > 0 and api["ttft_ms"]["p50"] is not None
    assert max(r["generation"]["api"]["generated_tokens_per_s"] for r in rows) > 0
    assert {"running", "waiting", "kv_used_bytes", "kv_reserved_bytes"} <= set(rows[-1]["generation"])


def _cli(daemon: DaemonProc, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lastmile.appliance.client.cli", *args, "--socket", str(daemon.socket)],
                          input=stdin, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_cli_generate_and_chat(served, reference) -> None:
    daemon = served[0]
    expected, _, n, _ = reference(messages=QUESTION, max_tokens=10)
    out = _cli(daemon, "generate", MODEL, QUESTION[0]["content"], "--max-tokens", "10", "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == expected and result["completion_tokens"] == n and result["finish_reason"] in ("stop", "length")
    assert result["ttft_ms"] is not None
    out = _cli(daemon, "generate", MODEL, QUESTION[0]["content"], "--max-tokens", "10", "--temperature", "0")
    assert out.returncode == 0 and out.stdout.rstrip("\n") == expected and "tokens" in out.stderr
    out = _cli(daemon, "generate", MODEL, "x", "--temperature", "9")
    assert out.returncode == 1 and "temperature" in out.stderr and "HTTP 400" in out.stderr
    out = _cli(daemon, "generate", "nope", "x")
    assert out.returncode == 1 and "not loaded" in out.stderr
    # a piped conversation: two turns, then /exit
    out = _cli(daemon, "chat", MODEL, "--max-tokens", "10", "--temperature", "0", stdin=f"{QUESTION[0]['content']}\nAnd Italy?\n/exit\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == expected and len(lines) == 2


def test_runner_killed_mid_stream_ends_with_an_error_event(served) -> None:
    """kill -9 of the runner mid-stream: an error event, then [DONE], never a hang (last: the
    model restarts afterwards)."""
    daemon = served[0]
    pid = _call(daemon, "GET", f"/lm/v1/models/{MODEL}")[1]["runners"][0]["pid"]

    async def stream_and_kill() -> list[bytes]:
        events = []
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as s:
            async with s.post("http://localhost/v1/chat/completions", json={
                    "model": MODEL, "messages": QUESTION, "max_tokens": 1500, "temperature": 0, "stream": True}) as resp:
                assert resp.status == 200
                async with asyncio.timeout(20):
                    killed = False
                    buffer = b""
                    async for data in resp.content.iter_any():
                        buffer += data
                        while b"\n\n" in buffer:
                            event, buffer = buffer.split(b"\n\n", 1)
                            events.append(event)
                        if not killed and len(events) >= 3:
                            os.kill(pid, signal.SIGKILL)
                            killed = True
        return events

    events = asyncio.run(stream_and_kill())
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][5:])["error"]
    assert error["type"] == "server_error" and error["message"]
    deadline = time.monotonic() + 120
    while _call(daemon, "GET", f"/lm/v1/models/{MODEL}")[1]["state"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    reply = _tcp_client(served).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens <= 3


def test_tui_chat_screen_streams_an_answer(served, reference) -> None:
    """The chat screen (key c): pick the model, send a message, the answer equals the greedy
    reference and the figures line shows TTFT and tokens/s."""
    from textual.widgets import Input, RichLog, Static

    from lastmile.appliance.client.api import LastmileClient
    from lastmile.tui.app import LastmileApp
    from lastmile.tui.screens.chat import ChatScreen
    from tests.tui.conftest import wait_until

    daemon = served[0]
    expected, _, _, _ = reference(messages=QUESTION, max_tokens=12)

    async def drive() -> None:
        app = LastmileApp(LastmileClient(daemon.socket), rate_hz=5)
        async with app.run_test(size=(140, 40)) as pilot:
            step = lambda: pilot.pause(0.05)  # noqa: E731
            await pilot.press("c")
            await wait_until(lambda: isinstance(app.screen, ChatScreen), step=step, what="the chat screen")
            screen = app.screen
            await wait_until(lambda: screen.model_name == MODEL, step=step, what="the tiny model in the picker")
            screen.query_one("#c-temp", Input).value = "0"
            screen.query_one("#c-max", Input).value = "12"
            field = screen.query_one("#c-input", Input)
            field.focus()
            field.value = QUESTION[0]["content"]
            await pilot.press("enter")
            await wait_until(lambda: screen.last is not None, timeout=60, step=step, what="the answer")
            assert screen.last.text == expected
            assert screen.history[-1] == {"role": "assistant", "content": expected}
            stats = str(screen.query_one("#c-stats", Static).render())
            assert "TTFT" in stats and "tokens" in stats
            log = screen.query_one("#c-log", RichLog)
            assert any(expected[:10] in "".join(seg.text for seg in line) for line in log.lines)

    asyncio.run(drive())


def test_ollama_chat_generate_tags_ps(served, reference) -> None:
    """Ollama's API (NDJSON): what tools built for Ollama call."""
    daemon = served[0]
    expected, prompt_tokens, n, finish = reference(messages=QUESTION, max_tokens=12)
    status, body = _call(daemon, "POST", "/api/chat", {"model": f"{MODEL}:latest", "messages": QUESTION, "stream": False,
                                                       "options": {"temperature": 0, "num_predict": 12}})
    assert status == 200 and body["message"] == {"role": "assistant", "content": expected} and body["done"] is True
    assert body["prompt_eval_count"] == prompt_tokens and body["eval_count"] == n and body["done_reason"] == finish
    assert body["total_duration"] >= body["eval_duration"] > 0
    status, raw = _call(daemon, "POST", "/api/chat", {"model": MODEL, "messages": QUESTION, "options": {"temperature": 0, "num_predict": 12}})
    lines = [json.loads(x) for x in raw.decode().splitlines()]
    assert status == 200 and "".join(x["message"]["content"] for x in lines) == expected
    assert [x["done"] for x in lines].count(True) == 1 and lines[-1]["done"] and lines[-1]["eval_count"] == n
    raw_text, _, _, _ = reference(prompt="The capital of Spain is", max_tokens=8)
    status, body = _call(daemon, "POST", "/api/generate", {"model": MODEL, "prompt": "The capital of Spain is", "raw": True,
                                                           "stream": False, "options": {"temperature": 0, "num_predict": 8}})
    assert status == 200 and body["response"] == raw_text
    status, body = _call(daemon, "POST", "/api/generate", {"model": MODEL, "prompt": QUESTION[0]["content"], "stream": False,
                                                           "options": {"temperature": 0, "num_predict": 12}})
    assert status == 200 and body["response"] == expected  # not raw: the chat template, as /api/chat
    for bad, field in (({"options": {"num_ctx": 4096}}, "options.num_ctx"), ({"options": {"temperature": -1}}, "options.temperature"),
                       ({"format": "yaml"}, "format"), ({"options": {"num_predict": 0}}, "options.num_predict")):
        status, body = _call(daemon, "POST", "/api/chat", {"model": MODEL, "messages": QUESTION, **bad})
        assert status == 400 and body["field"] == field, body
    status, body = _call(daemon, "GET", "/api/tags")
    tags = {m["name"]: m for m in body["models"]}
    assert f"{MODEL}:latest" in tags and tags[f"{MODEL}:latest"]["size"] > 0 and "demo-mlp:latest" not in tags
    status, body = _call(daemon, "GET", "/api/ps")
    assert [m["name"] for m in body["models"]] == [f"{MODEL}:latest"]


def test_every_v1_route_says_an_unknown_model_the_same_way(served) -> None:
    """One OpenAI error table: the generation routes, the embeddings route and the bearer check
    (before any route) give the same type and code for the same status."""
    daemon, base, _ = served
    errors = {}
    for path, body in (("/v1/chat/completions", {"model": "nope", "messages": QUESTION}),
                       ("/v1/completions", {"model": "nope", "prompt": "hi"}),
                       ("/v1/embeddings", {"model": "nope", "input": "hi"})):
        status, reply = _call(daemon, "POST", path, body)
        assert status == 404, (path, reply)
        errors[path] = (reply["error"]["type"], reply["error"]["code"])
    assert set(errors.values()) == {("invalid_request_error", "model_not_found")}, errors
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert denied.value.body["type"] == "authentication_error" and denied.value.body["code"] == "invalid_api_key"
