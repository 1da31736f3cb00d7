"""The daemon's side of a generation runner: streams of chunks over the runner pipes.

A :class:`GenerationRunner` is a :class:`lastmile.runtime.runner.Runner` (same forkserver,
start, stop, death detection) whose child is :mod:`lastmile.runtime.generation.serve`. Each
generation is a :class:`GenerationStream`: an async iterator of
:class:`~lastmile.runtime.generation.types.GenerationChunk` that raises the runner's refusal
(``ContextOverflow``, ``QueueFull``...) on its first ``__anext__``, before any chunk, raises
``RunnerDied`` if the child dies mid-stream, and on ``aclose()`` (the client went away) sends
``Cancel`` so the child frees the slot and KV cache at once.

Memory per stream here is bounded by construction: a stream receives at most ``max_tokens``
chunks and ``max_tokens`` is bounded by the model's ``max_context``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from lastmile.runtime.errors import InferenceError, ModelUnavailable, QueueFull, RunnerDied
from lastmile.runtime.generation import serve
from lastmile.runtime.generation.types import (ContextOverflow, GenerationChunk, GenerationRequest,
                                               InvalidSamplingParams)
from lastmile.runtime.protocol import NO_SEQ, Accepted, Cancel, EngineStats, Generate, Refused, Slots, ToDaemon, Tokens, encode
from lastmile.runtime.runner import Runner

logger = logging.getLogger("lastmile.generation")

_END = object()


def rebuild_rejection(kind: str, args: tuple) -> Exception:
    """The exception a child's :class:`Refused` message stands for."""
    if kind == "context_overflow":
        return ContextOverflow(*args)
    if kind == "queue_full":
        return QueueFull(*args)
    if kind == "invalid":
        exc = InvalidSamplingParams(args[1])
        exc.field = args[0]
        return exc
    return InferenceError(args[0] if args else "generation refused")


class GenerationStream:
    """One generation's chunks. Use ``async for``; ``aclose()`` cancels it in the runner."""

    def __init__(self, runner: "GenerationRunner", key: int) -> None:
        self._runner = runner
        self.key = key
        self._queue: asyncio.Queue = asyncio.Queue()  # bounded by max_tokens (see module doc)
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.prompt_tokens: int | None = None
        self.finished = False
        self.closed = False
        self.submitted = time.monotonic()

    # --- fed by the runner ------------------------------------------------------------------
    def _accept(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        if not self.accepted.done():
            self.accepted.set_result(prompt_tokens)

    def _fail(self, exc: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(exc)
            self.accepted.exception()  # retrieved: the iterator re-raises it
        else:
            self._queue.put_nowait(exc)
        self.finished = True

    def _chunk(self, chunk: GenerationChunk) -> None:
        self._queue.put_nowait(chunk)
        if chunk.finish_reason is not None:
            self.finished = True

    # --- the iterator -----------------------------------------------------------------------
    def __aiter__(self) -> "GenerationStream":
        return self

    def __await__(self):  # ``await stream``: wait for acceptance (or the refusal), then use it
        return self._wait_accepted().__await__()

    async def _wait_accepted(self) -> "GenerationStream":
        await self.accepted
        return self

    async def __anext__(self) -> GenerationChunk:
        if self.closed:
            raise StopAsyncIteration
        try:
            await self.accepted
            item = await self._queue.get()
        except BaseException:
            if not self.finished:
                await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        if item.finish_reason is not None:
            self.closed = True
            self._runner._sequences.pop(self.key, None)
        return item

    async def aclose(self) -> None:
        """Stop this generation now: the runner frees its slot and KV cache."""
        if self.closed and self.finished:
            return
        self.closed = True
        if not self.finished:
            self._runner._cancel(self.key)
        self._runner._sequences.pop(self.key, None)


class RefusedStream:
    """A stream refused before it reached a runner: its first ``__anext__`` raises why, so
    callers handle every refusal in one place."""

    def __init__(self, exc: BaseException) -> None:
        self._exc: BaseException | None = exc

    def __aiter__(self) -> "RefusedStream":
        return self

    async def __anext__(self) -> GenerationChunk:
        exc, self._exc = self._exc, None
        if exc is None:
            raise StopAsyncIteration
        raise exc

    def __await__(self):
        return self.__anext__().__await__()

    async def aclose(self) -> None:
        self._exc = None


class GenerationRunner(Runner):
    """A runner whose child serves generation streams (see :mod:`.serve`)."""

    child_target = staticmethod(serve.main)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keys = itertools.count(1)
        self._sequences: dict[int, GenerationStream] = {}
        self.generation: dict[str, Any] = {}  # the child's latest scheduler stats
        self.last_activity = time.time()  # last chunk received (keep_alive counts idle from here)

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Start one generation; refusals surface on the stream's first ``__anext__``."""
        key = next(self._keys)
        stream = GenerationStream(self, key)
        if self.state != "ready":
            stream._fail(self._unavailable())
            return stream
        self._sequences[key] = stream
        try:
            self._tx.send_bytes(encode(Generate(key, request)))
        except OSError:
            self._sequences.pop(key, None)
            stream._fail(self._unavailable())
        return stream

    def set_slots(self, limit: int) -> None:
        """The memory ladder's fewer (or again more) slots; see ``GenerationScheduler.set_slots``."""
        if self.state == "ready":
            self._send_quiet(Slots(NO_SEQ, limit))

    def _cancel(self, key: int) -> None:
        if self._sequences.pop(key, None) is not None and self.state == "ready":
            self._send_quiet(Cancel(key))

    @property
    def busy(self) -> bool:
        return bool(self._calls or self._sequences)

    def _dispatch(self, msg: ToDaemon) -> None:
        kind = type(msg)
        if kind is Tokens:
            self.last_activity = time.time()
            for key, chunk in msg.chunks:
                stream = self._sequences.get(key)
                if stream is not None:
                    stream._chunk(chunk)
                    if chunk.finish_reason is not None:
                        self._sequences.pop(key, None)
        elif kind is Accepted:
            stream = self._sequences.get(msg.seq)
            if stream is not None:
                stream._accept(msg.prompt_tokens)
        elif kind is Refused:
            stream = self._sequences.pop(msg.seq, None)
            if stream is not None:
                stream._fail(rebuild_rejection(msg.kind, msg.args))
        elif kind is EngineStats:
            self.generation = msg.data
        else:
            super()._dispatch(msg)

    def _on_sentinel(self) -> None:
        super()._on_sentinel()
        streams, self._sequences = self._sequences, {}
        if self.state == "dead":
            exc: BaseException = RunnerDied(self._death or f"runner for {self.name} died", self.exitcode)
        else:
            exc = ModelUnavailable(f"runner for {self.name} was stopped")
        for stream in streams.values():
            stream._fail(exc)
