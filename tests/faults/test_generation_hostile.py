"""Generation under hostile input (issue 23): one request never takes the others down.

One daemon serves the module, on its Unix socket and on TCP with a token, with the tiny causal
LM (``runtime/generation/tiny.py``) loaded twice on the DeepSpeed/torch engine at fp32:
``tiny`` with 4 slots and ``tiny1`` (4 layers, a 16k context) with 1 slot (the queue tests). The daemon's ``[defaults]``
pick the same engine, so Ollama's preload call loads a model in about 3 s (ORT-GenAI's int4
build would take 20). Each test states the figure it measures; docs/reliability.md has them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from tests.conftest import DaemonProc, start_tcp_daemon

pytestmark = pytest.mark.faults

TOKEN = "the-right-token-for-issue-23-0123456789"
GEN = {"engine": "deepspeed", "precision": "fp32"}
DEFAULTS = '[defaults]\nengine = "deepspeed"\nprecision = "fp32"\n'
TINY1_CONTEXT = 16384
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, int]]:
    from lastmile.runtime.generation.tiny import build_tiny_lm

    home = tmp_path_factory.mktemp("gen-hostile")
    store = home / "store"
    store.mkdir()
    build_tiny_lm(store / "tiny")
    # tiny1's one slot must stay held past the 1 s deadlines whatever the CPU's speed (the 2-layer
    # model makes ~2000 tokens/s): a long context and more layers, so a stream lasts seconds
    build_tiny_lm(store / "tiny1", max_position_embeddings=TINY1_CONTEXT, layers=4)
    daemon, port = start_tcp_daemon(home / "d", store, TOKEN, server_extra="body_timeout_s = 20", extra_config=DEFAULTS)
    try:
        for name, extra in (("tiny", {"max_num_seqs": 4}), ("tiny1", {"max_num_seqs": 1, "max_context": TINY1_CONTEXT})):
            status, body = asyncio.run(_once(daemon, "POST", f"/v2/repository/models/{name}/load",
                                             {"parameters": {**GEN, **extra}}))
            assert status == 200, body
        yield daemon, port
    finally:
        daemon.stop()


def _session(daemon: DaemonProc) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket)),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def _call(s: aiohttp.ClientSession, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with s.request(method, "http://localhost" + path, json=body if data is None else None, data=data,
                         headers=headers) as resp:
        payload = await resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, json.loads(payload) if ctype.startswith("application/json") else payload, resp.headers


async def _once(daemon: DaemonProc, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    async with _session(daemon) as s:  # a connection of its own: a refusal may close it
        status, payload, _ = await _call(s, method, path, body, **kw)
        return status, payload


async def _runner_pid(s: aiohttp.ClientSession, name: str) -> int:
    status, body, _ = await _call(s, "GET", f"/lm/v1/models/{name}")
    assert status == 200 and body["state"] == "ready", body
    return body["runners"][0]["pid"]


async def _stream_gaps(s: aiohttp.ClientSession, stop: asyncio.Event, gaps: list[float], name: str = "tiny",
                       max_tokens: int = 1500) -> int:
    """One streamed chat until ``stop`` (then the client goes away): the gaps between its events."""
    events = 0
    async with s.post("http://localhost/v1/chat/completions", json={
            "model": name, "messages": HI, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        last = None
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last, events = now, events + 1
            if stop.is_set():
                break
    return events


def _p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))] if s else 0.0


# --- 1a: sampling values out of the engines' bounds ---------------------------------------------

BAD_SAMPLING: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"seed": 2**31}, "seed"),          # ORT-GenAI: int32 cast fails in set_search_options
    ("/v1/chat/completions", {"seed": -(2**31) - 1}, "seed"),
    ("/v1/chat/completions", {"top_k": 1_000_000}, "top_k"),    # ORT-GenAI: top_k > vocab_size raises
    ("/v1/chat/completions", {"top_k": 513}, "top_k"),          # the tiny model's vocabulary is 512
    ("/v1/chat/completions", {"top_p": 1e-300, "temperature": 1.0}, "top_p"),  # 0 in float32: NaN in torch.multinomial
    ("/v1/completions", {"top_p": 1e-40, "temperature": 1.0}, "top_p"),
    ("/v2/models/tiny/generate", {"parameters": {"top_k": 100_000}}, "parameters.top_k"),
    ("/api/generate", {"options": {"seed": 2**40}}, "options.seed"),
    ("/api/chat", {"options": {"top_p": 1e-300, "temperature": 1.0}}, "options.top_p"),
]


def _body(path: str, extra: dict[str, Any]) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        return {"model": "tiny", "messages": HI, "max_tokens": 4, **extra}
    if path == "/v1/completions":
        return {"model": "tiny", "prompt": "Hello", "max_tokens": 4, **extra}
    if path.startswith("/v2/"):
        return {"text_input": "Hello", **extra}
    if path == "/api/generate":
        return {"model": "tiny", "prompt": "Hello", "stream": False, **extra}
    return {"model": "tiny", "messages": HI, "stream": False, **extra}


async def test_out_of_range_sampling_is_400_and_a_loop_of_it_harms_no_one(served) -> None:
    """Every value an engine would throw on is a 400 naming the field; sent in a loop for 3 s
    (the issue's 20 s loop measured 0 errors too, see docs/reliability.md) beside a normal
    client, that client gets 0 errors and the runner keeps its pid."""
    daemon, _ = served
    async with _session(daemon) as s:
        pid = await _runner_pid(s, "tiny")
        for path, extra, field in BAD_SAMPLING:
            status, body, _ = await _call(s, "POST", path, _body(path, extra))
            assert status == 400, (path, extra, status, body)
            named = body["error"]["param"] if path.startswith("/v1/") else body.get("field", body["error"])
            assert field in str(named), (path, extra, body)
        normal: list[int] = []
        hostile: list[int] = []
        stop = time.monotonic() + 3.0

        async def attacker() -> None:
            i = 0
            while time.monotonic() < stop:
                path, extra, _ = BAD_SAMPLING[i % len(BAD_SAMPLING)]
                hostile.append((await _call(s, "POST", path, _body(path, extra)))[0])
                i += 1

        async def client() -> None:
            while time.monotonic() < stop:
                status, body, _ = await _call(s, "POST", "/v1/chat/completions",
                                              {"model": "tiny", "messages": HI, "max_tokens": 8, "temperature": 0.7, "seed": 7})
                normal.append(status)

        await asyncio.gather(attacker(), client())
        assert set(hostile) == {400} and len(hostile) > 20, hostile[:20]
        assert normal and set(normal) == {200}, normal
        assert await _runner_pid(s, "tiny") == pid
        print(f"\n{len(hostile)} hostile requests in 3 s, all 400; the normal client {len(normal)} x 200; runner pid unchanged")


# --- 2: oversized prompts refused in the daemon ------------------------------------------------


async def test_oversized_prompts_are_refused_in_the_daemon_while_four_streams_run(served) -> None:
    """Two clients send 100 KB prompts back to back and one sends ~1 MB ones while 4 streams
    run: each is refused by the daemon's bound (the body says ``prompt_tokens_at_least``,
    the runner never tokenizes it), and the streams' inter-token p99 stays under 250 ms."""
    daemon, _ = served
    async with _session(daemon) as s:
        stop = asyncio.Event()
        gaps: list[float] = []
        streams = [asyncio.create_task(_stream_gaps(s, stop, gaps)) for _ in range(4)]
        await asyncio.sleep(0.5)  # all four running
        refusals: list[tuple[int, float, dict[str, Any]]] = []
        big = "The capital of France is Paris. " * 3200  # 102 KB
        huge = "x" * 999_000  # just under the parser's 1,000,000-character bound

        async def sender(prompt: str, n: int) -> None:
            async with _session(daemon) as own:
                for _ in range(n):
                    t0 = time.monotonic()
                    status, body, _ = await _call(own, "POST", "/v1/completions",
                                                  {"model": "tiny", "prompt": prompt, "max_tokens": 16})
                    refusals.append((status, time.monotonic() - t0, body))

        before = len(gaps)
        await asyncio.gather(sender(big, 20), sender(big, 20), sender(huge, 5))
        during = gaps[before:]
        stop.set()
        await asyncio.gather(*streams)
        assert all(status == 400 for status, _, _ in refusals), [r[:2] for r in refusals if r[0] != 400]
        assert all("prompt_tokens_at_least" in body["error"] for _, _, body in refusals), refusals[0][2]
        assert all(body["error"]["param"] == "prompt" for _, _, body in refusals)
        median = statistics.median(t for _, t, _ in refusals)
        assert during, "the streams produced tokens while the prompts were refused"
        p99 = _p99(during)
        assert p99 < 0.25, (p99, sorted(during)[-5:])
        print(f"\n{len(refusals)} oversized prompts refused (median {median * 1000:.1f} ms); 4 streams' inter-token "
              f"p99 {p99 * 1000:.1f} ms over {len(during)} gaps meanwhile")


# --- 4: the token lock-out never locks out the right token -------------------------------------


async def test_the_right_token_always_passes_while_a_guesser_is_locked_out(served) -> None:
    """A wrong token every 0.1 s from 127.0.0.1 while a client with the right token asks
    every 0.1 s from the same address: the guesser is locked out (429), the client gets 0 x 429."""
    _, port = served
    base = f"http://127.0.0.1:{port}"
    right: list[int] = []
    wrong: list[int] = []
    stop = time.monotonic() + 3.0

    async def loop(token: str, into: list[int]) -> None:
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < stop:
                async with s.get(base + "/lm/v1/status", headers={"Authorization": f"Bearer {token}"}) as resp:
                    into.append(resp.status)
                await asyncio.sleep(0.1)

    await asyncio.gather(loop("guess-0123456789abcdef", wrong), loop(TOKEN, right))
    assert right and right.count(429) == 0 and set(right) == {200}, right
    # 5 free failures, then one more each time the lock-out (1 s, then 2 s...) has run out
    assert wrong.count(401) <= 8 and wrong.count(429) >= len(wrong) - 8 and wrong.count(429) >= 15, wrong
    print(f"\nguesser: {wrong.count(401)} x 401, {wrong.count(429)} x 429; right token: {len(right)} x 200, 0 x 429")


# --- 5: deadlines on queued and running generation ----------------------------------------------


async def test_a_queued_generation_gets_503_and_every_generation_ends_by_the_models_timeout(served) -> None:
    """``tiny1`` has one slot. A long stream holds it; with the model's ``timeout_s`` set to
    1 s (live), a second request waits for the slot and gets 503 + Retry-After (OpenAI's
    error shape) after about 1 s, and a long generation ends at about 1 s with
    ``lastmile_finish_reason: timeout``."""
    daemon, _ = served
    async with _session(daemon) as s:
        stop = asyncio.Event()
        gaps: list[float] = []
        holder = asyncio.create_task(_stream_gaps(s, stop, gaps, name="tiny1", max_tokens=TINY1_CONTEXT - 100))
        await asyncio.sleep(0.3)
        status, body, _ = await _call(s, "PATCH", "/lm/v1/models/tiny1", {"settings": {"timeout_s": 1.0}})
        assert status == 200, body
        try:
            async with _session(daemon) as other:
                t0 = time.monotonic()
                status, body, headers = await _call(other, "POST", "/v1/chat/completions",
                                                    {"model": "tiny1", "messages": HI, "max_tokens": 8})
                waited = time.monotonic() - t0
            assert status == 503, (status, body)
            assert int(headers["Retry-After"]) >= 1
            assert body["error"]["type"] == "server_error" and body["error"]["code"] == "queue_timeout", body
            assert 0.8 < waited < 3.0, waited
            stop.set()
            await holder
            t0 = time.monotonic()
            status, body, _ = await _call(s, "POST", "/v1/completions",
                                          {"model": "tiny1", "prompt": "The capital", "max_tokens": TINY1_CONTEXT - 100, "temperature": 0})
            took = time.monotonic() - t0
            assert status == 200, body
            choice = body["choices"][0]
            assert choice["finish_reason"] == "length" and choice.get("lastmile_finish_reason") == "timeout", choice
            assert took < 2.5 and body["usage"]["completion_tokens"] < TINY1_CONTEXT - 100, (took, body["usage"])
        finally:
            stop.set()
            await _call(s, "PATCH", "/lm/v1/models/tiny1", {"settings": {"timeout_s": 30.0}})
        print(f"\nqueued: 503 after {waited:.2f} s (timeout_s 1); a {TINY1_CONTEXT - 100}-token generation cut at {took:.2f} s "
              f"after {body['usage']['completion_tokens']} tokens")


# --- 6: bad input is a 4xx, never a 5xx or a traceback ------------------------------------------


def _raw(daemon: DaemonProc, request: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout)
    c.connect(str(daemon.socket))
    t0 = time.monotonic()
    try:
        c.sendall(request)
        return c.recv(4096), time.monotonic() - t0
    finally:
        c.close()


async def test_bad_bytes_are_4xx_without_a_traceback(served) -> None:
    daemon, port = served
    log_before = len(daemon.log_text())
    surrogate = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    status, body = await _once(daemon, "POST", "/v1/chat/completions", data=surrogate,
                               headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["param"] == "messages[0].content", body
    status, body = await _once(daemon, "POST", "/api/generate", data=b'{"model": "tiny", "prompt": "a\\udfff"}')
    assert status == 400 and "prompt" in body["error"], body
    status, body = await _once(daemon, "POST", "/v1/chat/completions",
                               data=b'{"model": "tiny", "max_tokens": ' + b"7" * 5000 + b', "messages": []}')
    assert status == 400 and "4300 digits" in body["error"]["message"], body
    status, body = await _once(daemon, "POST", "/v1/chat/completions", data=b'{"model": "tiny"}',
                               headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert status == 400 and "Content-Encoding" in body["error"]["message"], body
    for request in (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
                    b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(1000)) + b"\r\n",
                    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        answer, _ = _raw(daemon, request)
        assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:80]
    # a declared 65 MB body over the 64 MB limit: refused from the headers, no byte read
    answer, took = _raw(daemon, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 68157440\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and took < 1.0, (answer[:80], took)
    assert b'"type": "invalid_request_error"' in answer or b'"type":"invalid_request_error"' in answer
    # 401 over TCP on OpenAI's routes: OpenAI's error shape
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/models"):
            async with s.request("POST" if "chat" in path else "GET", f"http://127.0.0.1:{port}{path}", json={},
                                 headers={"Authorization": "Bearer not-the-token-0123456789"}) as resp:
                body = await resp.json()
                assert resp.status in (401, 429), body
                assert isinstance(body["error"], dict) and body["error"]["message"] and "type" in body["error"], body
        async with s.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            body = await resp.json()
            assert resp.status == 401 and body["error"]["code"] == "invalid_api_key", body
    time.sleep(0.3)
    log = daemon.log_text()[log_before:]
    assert "level=error" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("bad HTTP request") == 3, log[-3000:]


# --- 7: Ollama's preload, unload and show --------------------------------------------------------


async def test_ollama_preload_unload_and_show(served) -> None:
    daemon, _ = served
    async with _session(daemon) as s:
        status, body, _ = await _call(s, "POST", "/api/show", {"model": "tiny:latest"})
        assert status == 200, body
        assert "im_start" in body["template"] and body["details"]["family"] == "llama"
        assert body["model_info"]["general.architecture"] == "llama" and body["model_info"]["llama.context_length"] == 4096
        assert body["model_info"]["general.parameter_count"] > 0 and "FROM" in body["modelfile"]
        status, body, _ = await _call(s, "POST", "/api/show", {"model": "nope"})
        assert status == 404 and isinstance(body["error"], str)
        # loaded already: answered at once
        status, body, _ = await _call(s, "POST", "/api/generate", {"model": "tiny"})
        assert status == 200 and body["done"] is True and body["done_reason"] == "load" and body["response"] == "", body
        # keep_alive 0 and no prompt: unloaded now
        status, body, _ = await _call(s, "POST", "/api/generate", {"model": "tiny1", "keep_alive": 0})
        assert status == 200 and body["done_reason"] == "unload", body
        status, body, _ = await _call(s, "GET", "/api/ps")
        assert [m["name"] for m in body["models"]] == ["tiny:latest"], body
        # an empty prompt loads it again (the daemon's [defaults]: the torch engine), then it answers
        t0 = time.monotonic()
        status, body, _ = await _call(s, "POST", "/api/chat", {"model": "tiny1", "messages": []})
        assert status == 200 and body["done_reason"] == "load" and body["message"]["content"] == "", body
        loaded_in = time.monotonic() - t0
        status, body, _ = await _call(s, "POST", "/api/generate", {"model": "tiny1", "prompt": "Hi", "stream": False,
                                                                   "options": {"num_predict": 3, "temperature": 0}})
        assert status == 200 and body["done"] is True and body["eval_count"] == 3, body
        print(f"\nOllama preload: loaded tiny1 in {loaded_in:.2f} s; unload and show answered in Ollama's shape")


async def _finish_of(s: aiohttp.ClientSession, name: str, max_tokens: int, started: asyncio.Event | None = None) -> str:
    """One streamed chat to its end: its finish reason, or the error event's message."""
    async with s.post("http://localhost/v1/chat/completions", json={
            "model": name, "messages": HI, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        finish = "none"
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if started is not None:
                started.set()
            if event.get("error"):
                return "error: " + str(event["error"].get("message"))
            for choice in event.get("choices") or []:
                finish = choice.get("finish_reason") or finish
        return finish


async def test_a_reload_and_a_draining_unload_let_running_streams_finish(served) -> None:
    """``load`` with new settings while 4 streams run switches to new runners and lets the 4
    finish on the old one (they were cut with "runner for tiny was stopped"); ``unload`` with
    ``drain`` refuses new streams and lets the running one end before the runner stops."""
    daemon, _ = served
    async with _session(daemon) as s:
        started = asyncio.Event()
        streams = [asyncio.create_task(_finish_of(s, "tiny", 300, started)) for _ in range(4)]
        await asyncio.wait_for(started.wait(), 20)
        old = await _runner_pid(s, "tiny")
        status, body, _ = await _call(s, "POST", "/v2/repository/models/tiny/load",
                                      {"parameters": {**GEN, "max_num_seqs": 3}})
        assert status == 200, body
        assert await asyncio.gather(*streams) == ["length"] * 4
        assert await _runner_pid(s, "tiny") != old
        started = asyncio.Event()
        stream = asyncio.create_task(_finish_of(s, "tiny", 300, started))
        await asyncio.wait_for(started.wait(), 20)
        status, body, _ = await _call(s, "POST", "/v2/repository/models/tiny/unload", {"parameters": {"drain": True}})
        assert status == 200, body
        assert await stream == "length"
        status, body, _ = await _call(s, "POST", "/v2/repository/models/tiny/load", {"parameters": {**GEN, "max_num_seqs": 4}})
        assert status == 200, body
