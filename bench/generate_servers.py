"""The generation benchmark's comparison servers, both speaking the streaming subset of OpenAI's
``POST /v1/chat/completions`` that the load generator sends (so every server gets the same bytes):

- ``naive``: what one writes first. aiohttp, the HF model in the server process, and one
  ``transformers.generate`` per request in a thread (``run_in_executor``), its tokens pushed
  through a per-token streamer into the SSE response. No batching across requests.
- ``peer``: LitServe's ``OpenAISpec`` (LitServe is a streaming serving framework; dev extra),
  one inference worker, ``predict`` a generator over the same per-token streamer.

Both render the chat template exactly as Lastmile's runner does
(``apply_chat_template(..., add_generation_prompt=True)``), greedy, same ``max_tokens``.

``python -m bench.generate_servers naive|peer --model-dir DIR (--socket PATH | --port N) [--threads 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
from typing import Any, Iterator


def _load(model_dir: str, threads: int) -> tuple[Any, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


class TokenStreamer:
    """``transformers`` streamer that hands over each new token id (TextIteratorStreamer waits
    for word boundaries, which would blur the inter-token latency being measured)."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(int(t))

    def end(self) -> None:
        self.q.put(None)

    def __iter__(self) -> Iterator[int]:
        while (t := self.q.get()) is not None:
            yield t


def _generate_tokens(tok: Any, model: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[int, Iterator[str]]:
    import torch

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    streamer = TokenStreamer()

    def work() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, streamer=streamer)

    threading.Thread(target=work, daemon=True).start()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])

    def pieces() -> Iterator[str]:
        previous = ""
        got: list[int] = []
        for t in streamer:
            if t in eos:
                continue
            got.append(t)
            full = tok.decode(got, skip_special_tokens=True)
            yield full[len(previous):]
            previous = full

    return ids.shape[1], pieces()


def naive_app(model_dir: str, threads: int) -> Any:
    from aiohttp import web

    tok, model = _load(model_dir, threads)
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        loop = asyncio.get_running_loop()
        prompt_tokens, pieces = _generate_tokens(tok, model, body["messages"], int(body.get("max_tokens", 64)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n, done = 0, object()
        while True:
            piece = await loop.run_in_executor(None, next, pieces, done)
            if piece is done:
                break
            n += 1
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        final = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}}
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", ready)
    return app


def run_peer(model_dir: str, threads: int, port: int) -> None:
    from bench.generate_peer import serve

    serve(model_dir, threads, port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["naive", "peer"])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--socket")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.kind == "peer":
        run_peer(args.model_dir, args.threads, args.port)
        return 0
    from bench.common import serve_app

    serve_app(naive_app(args.model_dir, args.threads), args.socket, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
