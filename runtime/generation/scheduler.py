"""Requests in, chunks out: the runner-side layer above a ``GenerationEngine``.

The engine knows token ids and slots; this layer knows requests. It renders chat messages
with the folder's chat template, counts prompt tokens, refuses what can never fit
(``ContextOverflow``) or what would queue without bound (``QueueFull``), detokenizes
incrementally, cuts at stop strings, ends sequences on EOS / max_tokens / deadline, and keeps
the counters the daemon exports (tokens, time to first token, inter-token latency).

Under memory pressure the daemon's ladder lowers the **slot limit** (:meth:`set_slots`): the
newest sequences beyond it are **preempted**: the engine drops them (their KV cache is freed at
once) and they wait at the head of the queue; when a slot frees they are **recomputed**: the
prompt plus the tokens already generated go in as a new prompt, and the stream goes on where
it stopped. Greedy output is unchanged by this (the same tokens in give the same next token);
a sampled stream's random generator starts again, so a seeded sample is reproducible only
without preemption. The client sees a pause, never an error.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Hashable

from lastmile.runtime.errors import QueueFull
from lastmile.runtime.generation.detok import TextStream
from lastmile.runtime.generation.engine import GenerationEngine
from lastmile.runtime.generation.types import ContextOverflow, GenerationChunk, GenerationRequest

#: Latency samples kept per kind (TTFT, inter-token); enough for p50/p99, bounded memory.
SAMPLES = 2048


@dataclass(slots=True)
class _Req:
    seq_id: int
    request: GenerationRequest
    prompt_tokens: int
    stream: TextStream
    submitted: float
    deadline: float | None
    prompt_ids: list[int]
    generated: list[int]
    completion: int = 0
    last_token_at: float | None = None
    in_engine: bool = True  # False while preempted (or held under a lowered slot limit)
    constraint: Any = None  # a SeqConstraint (constraints.py) or None: its state survives a preemption


class GenerationScheduler:
    """One model's generation requests over one engine; not thread-safe (one loop drives it)."""

    def __init__(self, engine: GenerationEngine, tokenizer: Any, *, max_queue: int = 64) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self._reqs: dict[Hashable, _Req] = {}
        self._by_seq: dict[int, Hashable] = {}
        self._next_seq = 0
        self.slot_limit = engine.max_num_seqs  # lowered by the memory ladder (set_slots)
        self._held: collections.deque[Hashable] = collections.deque()  # waiting for a slot under the limit
        self.preempted_total = 0
        self.failures: list[tuple[Hashable, str]] = []
        self.failed_total = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.requests_total = 0
        self.ttft_s: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self.itl_s: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._compiler: Any = None  # ConstraintCompiler, made at the first constrained request

    # --- requests --------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat messages through the folder's chat template)."""
        which = request.input_field()
        if which == "prompt_token_ids":
            ids = [int(t) for t in request.prompt_token_ids]  # type: ignore[union-attr]
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in ids):
                raise _invalid("prompt_token_ids", f"token ids must be in [0, {vocab})")
            return ids
        if which == "messages":
            msgs = [dict(m) for m in request.messages]  # type: ignore[union-attr]
            for m in msgs:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise _invalid("messages", "each message needs string 'role' and 'content'")
            if not getattr(self.tokenizer, "chat_template", None):
                raise _invalid("messages", "this model has no chat template; send a prompt")
            tools = [dict(t) for t in request.tools] if request.tools else None
            template = self.tokenizer.chat_template
            if tools and isinstance(template, str) and "tools" in template:  # the model's own tools section
                text = self.tokenizer.apply_chat_template(
                    msgs, tools=[{"type": "function", "function": t} for t in tools],
                    tokenize=False, add_generation_prompt=True)
            else:
                if tools:
                    from lastmile.runtime.generation.constraints import render_tools

                    msgs = render_tools(msgs, tools)
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request.prompt)["input_ids"])

    def submit(self, key: Hashable, request: GenerationRequest, now: float | None = None) -> int:
        """Queue a request; return its prompt token count. Raises before queueing anything."""
        request.params.validate()
        ids = self.encode(request)
        field = request.input_field()
        n, mt, ctx = len(ids), request.params.max_tokens, self.engine.max_context
        if not ids:
            raise _invalid(field, "the prompt is empty")
        if n + mt > ctx:
            raise ContextOverflow(n, mt, ctx, "max_tokens" if n < ctx else field)
        waiting = self.engine.stats()["waiting"] + len(self._held)
        if waiting >= self.max_queue:
            raise QueueFull(waiting, self.max_queue, retry_after_s=max(1.0, 0.1 * waiting))
        if key in self._reqs:
            raise _invalid("id", f"request {key!r} is already running")
        constraint = self.compile(request.constraint) if request.constraint is not None else None
        now = time.monotonic() if now is None else now
        r = _Req(-1, request, n, TextStream(self.tokenizer, request.params.stop), now,
                 None if request.deadline_s is None else now + request.deadline_s, ids, [], in_engine=False,
                 constraint=constraint)
        held = bool(self._held) or (self.slot_limit < self.engine.max_num_seqs and self._in_engine() >= self.slot_limit)
        self._reqs[key] = r
        if held:
            self._held.append(key)
        else:
            self._start(key, r)
        self.prompt_tokens_total += n
        self.requests_total += 1
        return n

    def compile(self, constraint: dict) -> Any:
        """A per-sequence matcher for ``constraint`` (raises ``ConstraintError`` naming the
        field: a 400 before any token). Compiled grammars are cached by hash."""
        from lastmile.runtime.generation.constraints import ConstraintCompiler

        if self._compiler is None:
            width = getattr(self.engine, "vocab_size", 0) or None
            self._compiler = ConstraintCompiler(self.tokenizer, self.engine.eos_token_ids, width)
        return self._compiler.compile(constraint)

    def _start(self, key: Hashable, r: _Req) -> None:
        """Hand ``r`` to the engine: its prompt, plus what it generated before a preemption."""
        seq = self._next_seq
        self._next_seq += 1
        params = r.request.params
        if r.generated:
            params = dataclasses.replace(params, max_tokens=params.max_tokens - r.completion)
        if r.constraint is not None:
            self.engine.add(seq, r.prompt_ids + r.generated, params, constraint=r.constraint)
        else:
            self.engine.add(seq, r.prompt_ids + r.generated, params)
        r.seq_id, r.in_engine = seq, True
        self._by_seq[seq] = key

    def _in_engine(self) -> int:
        return len(self._reqs) - len(self._held)

    def set_slots(self, limit: int) -> int:
        """At most ``limit`` sequences in the engine (clamped to [1, max_num_seqs]); the newest
        beyond it are preempted now (KV freed) and resumed by recompute when slots free.
        Returns how many were preempted."""
        self.slot_limit = max(1, min(int(limit), self.engine.max_num_seqs))
        running = [key for key, r in self._reqs.items() if r.in_engine]  # submission order
        victims = running[self.slot_limit:]
        for key in reversed(victims):  # newest first to the queue's head: they resume oldest first
            r = self._reqs[key]
            self.engine.cancel(r.seq_id)
            self._by_seq.pop(r.seq_id, None)
            r.in_engine = False
            self._held.appendleft(key)
        self.preempted_total += len(victims)
        return len(victims)

    def _admit_held(self) -> None:
        while self._held and (self._in_engine() < self.slot_limit or self.slot_limit >= self.engine.max_num_seqs):
            key = self._held.popleft()
            self._start(key, self._reqs[key])

    def cancel(self, key: Hashable) -> bool:
        """Drop a request (the client went away): its slot and KV are freed now."""
        r = self._reqs.pop(key, None)
        if r is None:
            return False
        if r.in_engine:
            self._by_seq.pop(r.seq_id, None)
            self.engine.cancel(r.seq_id)
        else:
            self._held.remove(key)
        return True

    def has_work(self) -> bool:
        return bool(self._reqs)

    # --- the loop --------------------------------------------------------------------------
    def step(self) -> list[tuple[Hashable, GenerationChunk]]:
        """One engine iteration; the chunks it produced (a finished request's last chunk has
        ``finish_reason``; the request is then forgotten)."""
        out: list[tuple[Hashable, GenerationChunk]] = []
        now = time.monotonic()
        for key, r in list(self._reqs.items()):  # deadlines first: no compute for the late
            if r.deadline is not None and now >= r.deadline:
                out.append((key, self._finish(key, r, "timeout", r.stream.flush(), ())))
        if not self._reqs:
            return out
        self._admit_held()
        try:
            produced = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one batch's failure ends its sequences, not the runner
            produced = []
            why = f"engine step failed: {type(exc).__name__}: {exc}"
            for key in [k for k, r in self._reqs.items() if r.in_engine]:
                self._fail(key, why)
        for seq, why in self.engine.take_failures():
            key = self._by_seq.get(seq)
            if key is not None:
                self._fail(key, why)
        now = time.monotonic()
        for seq, tok in produced:
            key = self._by_seq.get(seq)
            if key is None:
                continue
            try:
                chunk = self._advance(key, self._reqs[key], tok, now)
            except Exception as exc:  # noqa: BLE001 - e.g. detokenizing: this request ends alone
                self._fail(key, f"{type(exc).__name__}: {exc}")
                continue
            out.append((key, chunk))
        return out

    def _advance(self, key: Hashable, r: _Req, tok: int, now: float) -> GenerationChunk:
        """One new token of ``r``: its chunk (the last one when it ends the request)."""
        if tok < 0:  # the engine ended the sequence itself (an EOS it did not report)
            return self._finish(key, r, "stop", r.stream.flush(), ())
        r.completion += 1
        r.generated.append(tok)
        self.generated_tokens_total += 1
        if r.last_token_at is None:
            self.ttft_s.append(now - r.submitted)
        else:
            self.itl_s.append(now - r.last_token_at)
        r.last_token_at = now
        if tok in self.engine.eos_token_ids:
            return self._finish(key, r, "stop", r.stream.flush(), (tok,))
        text = r.stream.add(tok)
        if r.stream.stopped:
            return self._finish(key, r, "stop", text, (tok,))
        if r.completion >= r.request.params.max_tokens:
            return self._finish(key, r, "length", text + r.stream.flush(), (tok,))
        return GenerationChunk(text, (tok,), None, r.prompt_tokens, r.completion)

    def _fail(self, key: Hashable, why: str) -> None:
        """End one request with an error (it is forgotten; ``take_failures`` reports it)."""
        if self.cancel(key):
            self.failures.append((key, why))
            self.failed_total += 1

    def take_failures(self) -> list[tuple[Hashable, str]]:
        """Requests ended by an error since the last call: ``(key, why)``."""
        failures, self.failures = self.failures, []
        return failures

    def _finish(self, key: Hashable, r: _Req, reason: str, text: str, ids: tuple[int, ...]) -> GenerationChunk:
        self.cancel(key)
        return GenerationChunk(text, ids, reason, r.prompt_tokens, r.completion)

    def stats(self) -> dict[str, Any]:
        """The ``generation`` dict of a model's description."""
        return {
            **self.engine.info(), **self.engine.stats(), "max_queue": self.max_queue,
            "waiting": self.engine.stats()["waiting"] + len(self._held),
            "slot_limit": self.slot_limit, "preempted_total": self.preempted_total,
            "failed_total": self.failed_total,
            "requests_total": self.requests_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generated_tokens_total": self.generated_tokens_total,
            "ttft_s": _summary(self.ttft_s), "inter_token_s": _summary(self.itl_s),
            **(self._compiler.stats() if self._compiler is not None else {}),
        }


def _summary(samples: collections.deque[float]) -> dict[str, float | int]:
    if not samples:
        return {"count": 0}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"count": len(s), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def _invalid(field: str, msg: str) -> ValueError:
    from lastmile.runtime.generation.types import InvalidSamplingParams

    exc = InvalidSamplingParams(f"{field}: {msg}")
    exc.field = field
    return exc
