"""Text generation from the client side: one streaming call (:func:`generate`) that the CLI's
``lastmile chat`` / ``lastmile generate`` and the TUI's chat screen share, over the daemon's
OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``) and its SSE streams.

Why the OpenAI routes and not a private one: the CLI then exercises exactly what every other
client of the appliance uses, and what it measures (time to first token, tokens/s) is what
those clients get.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from lastmile.appliance.client.api import ApiError, ClientError, LastmileClient

MAX_LINE = 1 << 20  # one SSE event; far above any chunk the daemon sends


@dataclass
class Generation:
    """One finished (or stopped) generation and what it cost."""

    model: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None  # request sent -> first text received
    total_s: float = 0.0
    chunks: int = 0
    stopped: bool = False  # the user stopped it (Ctrl-C)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (what a reader sees scroll)."""
        tokens = self.completion_tokens if self.completion_tokens is not None else self.chunks
        if self.ttft_s is None or tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (tokens - 1) / (self.total_s - self.ttft_s)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = None if self.tokens_per_s is None else round(self.tokens_per_s, 2)
        out["ttft_ms"] = None if self.ttft_s is None else round(self.ttft_s * 1000, 1)
        out["total_ms"] = round(out.pop("total_s") * 1000, 1)
        out.pop("ttft_s")
        return out

    def summary(self) -> str:
        parts = [f"{self.completion_tokens if self.completion_tokens is not None else self.chunks} tokens"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s * 1000:.0f} ms")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        parts.append("stopped" if self.stopped else f"finish {self.finish_reason}")
        return ", ".join(parts)


#: The one set of sampling defaults of every client (``lastmile chat``/``generate``, the TUI's
#: chat screen, the demo): mild randomness with the tail cut off. Small chat models (SmolLM2
#: 135M-1.7B) drift into garbage at temperature 1 with no top-p; 0.7 / 0.9 keeps them on topic
#: and still varied.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 256


@dataclass
class SamplingOptions:
    """The sampling fields the CLI and the TUI expose; the defaults are the clients' one set
    (:data:`DEFAULT_TEMPERATURE`, :data:`DEFAULT_TOP_P`, :data:`DEFAULT_MAX_TOKENS`); None:
    the server's default."""

    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float | None = DEFAULT_TEMPERATURE
    top_p: float | None = DEFAULT_TOP_P
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if v not in (None, [])}
        return out


async def generate(client: LastmileClient, model: str, *, messages: list[dict[str, str]] | None = None,
                   prompt: str | None = None, options: SamplingOptions | None = None,
                   on_text: Callable[[str], None] | None = None) -> Generation:
    """Stream one generation, calling ``on_text`` with each piece of text as it arrives.

    ``messages`` goes to the chat API (the model's chat template applies); ``prompt`` to the
    completions API (raw text, no template). Refusals raise :class:`ApiError` with the
    daemon's message and the field it names; an error event mid-stream raises too. Cancelling
    the calling task closes the connection, which frees the sequence's slot in the daemon.
    """
    if (messages is None) == (prompt is None):
        raise ValueError("give exactly one of messages or prompt")
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            **(options or SamplingOptions()).body()}
    if messages is not None:
        body["messages"] = messages
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    result = Generation(model=model)
    started = time.perf_counter()
    try:
        async with client.stream(path, body) as resp:
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                if len(buffer) > MAX_LINE and b"\n\n" not in buffer:
                    raise ClientError(f"the daemon sent an event longer than {MAX_LINE} bytes")
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    if _event(raw, result, started, on_text):
                        return result
        if result.finish_reason is None:
            raise ClientError("the stream ended before the answer did (the daemon went away?)")
        return result
    except asyncio.CancelledError:
        result.stopped = True
        raise
    finally:
        result.total_s = time.perf_counter() - started


def _event(raw: bytes, result: Generation, started: float, on_text: Callable[[str], None] | None) -> bool:
    """Apply one SSE event; True at ``[DONE]``."""
    for line in raw.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        event = json.loads(data)
        error = event.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else str(error)
            code = 503 if not isinstance(error, dict) or error.get("type") == "server_error" else 500
            raise ApiError(code, f"the stream failed: {message}", error.get("param") if isinstance(error, dict) else None)
        if event.get("usage"):
            result.prompt_tokens = event["usage"].get("prompt_tokens")
            result.completion_tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or []:
            text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
            if text:
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - started
                result.text += text
                result.chunks += 1
                if on_text is not None:
                    on_text(text)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
    return False


# --- the CLI -------------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> SamplingOptions:
    """The flags over the clients' defaults (a flag not given keeps its default)."""
    base = SamplingOptions()
    return SamplingOptions(max_tokens=base.max_tokens if args.max_tokens is None else args.max_tokens,
                           temperature=base.temperature if args.temperature is None else args.temperature,
                           top_p=base.top_p if args.top_p is None else args.top_p,
                           top_k=args.top_k, seed=args.seed, stop=args.stop or [])


async def cmd_generate(client: LastmileClient, args: argparse.Namespace) -> int:
    """``lastmile generate NAME "prompt"``: the answer streams to stdout, the figures to stderr
    (``--json``: one JSON object at the end instead)."""
    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.raw:
        if args.system:
            raise ClientError("--system goes through the chat template, which --raw skips: put it in the prompt instead")
        kwargs: dict[str, Any] = {"prompt": args.prompt}
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        kwargs = {"messages": messages}
    result = await generate(client, args.name, options=_options(args), on_text=None if args.json else show, **kwargs)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print()
        print(f"[{result.summary()}]", file=sys.stderr)
    return 0


async def check_generation_model(client: LastmileClient, name: str) -> None:
    """Raise :class:`ClientError` (exit 1) unless ``name`` is a loaded generation model,
    saying what to do instead (load it, pick a generation model, check the name)."""
    data = await client.models()
    loaded = {m["name"]: m for m in data.get("loaded", [])}
    stored = {e["name"] for e in data.get("store", [])}
    model = loaded.get(name)
    if model is None:
        chat_models = sorted(n for n, m in loaded.items() if isinstance(m.get("generation"), dict))
        hint = f"; loaded generation models: {', '.join(chat_models)}" if chat_models else ""
        if name in stored:
            raise ClientError(f"model {name!r} is in the store but not loaded: lastmile load {name}{hint}")
        raise ClientError(f"model {name!r} is not in the store ({', '.join(sorted(stored)) or 'the store is empty'}){hint}")
    if not isinstance(model.get("generation"), dict):
        raise ClientError(f"model {name!r} is not a generation model (format {model.get('format')}); "
                          f"lastmile infer {name} serves it")


class _LineReader:
    """stdin lines from a daemon thread, so that a pending ``input()`` never keeps the process
    alive at exit (an executor thread would be joined by ``asyncio.run``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def read(self, prompt: str) -> asyncio.Future[str | None]:
        future: asyncio.Future[str | None] = self.loop.create_future()

        def work() -> None:
            try:
                line: str | None = input(prompt)
            except EOFError:
                line = None
            except Exception:  # noqa: BLE001 - a closed stdin is the end of the conversation
                line = None
            self.loop.call_soon_threadsafe(lambda: future.done() or future.set_result(line))

        threading.Thread(target=work, daemon=True).start()
        return future


async def cmd_chat(client: LastmileClient, args: argparse.Namespace) -> int:
    """``lastmile chat NAME``: a conversation that streams each answer; ``/exit`` or Ctrl-D ends
    it, Ctrl-C stops the answer being written (and ends the chat at the prompt)."""
    await check_generation_model(client, args.name)  # before the prompt: a wrong name fails at once
    loop = asyncio.get_running_loop()
    reader = _LineReader(loop)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.name} ({client.where}); /exit or Ctrl-D to leave, Ctrl-C stops an answer", file=sys.stderr)
    current: dict[str, Any] = {"task": None, "waiting": None}

    def on_sigint() -> None:
        task, waiting = current["task"], current["waiting"]
        if task is not None and not task.done():
            task.cancel()
        elif waiting is not None and not waiting.done():
            waiting.set_result(None)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # not the main thread: Ctrl-C ends the process instead
        pass
    try:
        while True:
            current["waiting"] = reader.read("you> " if interactive else "")
            line = await current["waiting"]
            if line is None:
                if interactive:
                    print(file=sys.stderr)
                return 1 if current.get("failed") else 0  # stdin ended after a refused answer: not a success
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                return 0
            history.append({"role": "user", "content": text})
            if interactive:
                sys.stdout.write(f"{args.name}> ")
            sys.stdout.flush()

            def show(piece: str) -> None:
                sys.stdout.write(piece)
                sys.stdout.flush()

            task = loop.create_task(generate(client, args.name, messages=list(history), options=_options(args), on_text=show))
            current["task"] = task
            try:
                result = await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
                print("\n[stopped]", file=sys.stderr)
                history.pop()
                continue
            except ApiError as exc:
                print(f"\nlastmile: {exc}", file=sys.stderr)
                current["failed"] = True
                history.pop()
                if exc.status == 404:
                    return exc.exit_code
                continue
            finally:
                current["task"] = None
            current["failed"] = False
            history.append({"role": "assistant", "content": result.text})
            print()
            if interactive:
                print(f"[{result.summary()}]", file=sys.stderr)
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError):
            pass


def add_chat_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``lastmile chat`` and ``lastmile generate`` (hooked into cli.build_parser)."""
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-tokens", type=int, help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")
    sampling.add_argument("--temperature", type=float, help=f"0 = greedy (default {DEFAULT_TEMPERATURE:g})")
    sampling.add_argument("--top-p", type=float, help=f"nucleus sampling mass, (0, 1] (default {DEFAULT_TOP_P:g})")
    sampling.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    sampling.add_argument("--seed", type=int, help="seed for reproducible sampling")
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    sampling.add_argument("--system", help="a system message to start the conversation with")
    chat = sub.add_parser("chat", help="talk to a loaded generation model (streaming; /exit or Ctrl-D ends)",
                          description="talk to a loaded generation model (streaming; /exit or Ctrl-D ends)", parents=[common, sampling])
    chat.add_argument("name")
    chat.set_defaults(func=cmd_chat)
    gen = sub.add_parser("generate", help="generate text from one prompt (streams to stdout)",
                         description="generate text from one prompt: the answer streams to stdout, figures to stderr", parents=[common, sampling])
    gen.add_argument("name")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is (/v1/completions), without the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object at the end: text, finish_reason, usage, TTFT, tokens/s")
    gen.set_defaults(func=cmd_generate)
