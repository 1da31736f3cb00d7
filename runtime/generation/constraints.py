"""Constrained decoding: a request's constraint compiled into a per-sequence token matcher.

The API side describes a constraint as plain data on ``GenerationRequest.constraint`` (it
crosses the runner pipe pickled):

* ``{"kind": "json_object"}``: any JSON object;
* ``{"kind": "json_schema", "schema": {...}, "field": "response_format"}``;
* ``{"kind": "tool_call", "tools": [{"name": ..., "parameters": {...}}, ...],
  "field": "tools"}``: exactly one object ``{"name": <one of the tools>, "arguments": <that
  tool's parameters>}`` (keys in that order, compact JSON).

The scheduler compiles it in ``submit`` (:class:`ConstraintCompiler`), before any token, so a
schema the grammar library refuses is a 400 naming the field, never unconstrained text. The
grammar library is llguidance (Microsoft's, the one vLLM, SGLang and llama.cpp use): it
works on CPU logits with the HF tokenizer, computes a mask in tens of microseconds and takes
JSON Schema directly, with ``$ref``/``$defs``, ``anyOf`` and string formats.

The engines apply :class:`SeqConstraint` where they choose a sequence's token: the logits row
gets -inf outside the allowed tokens (EOS is allowed only once the grammar accepts), the
chosen token is consumed, and when the grammar is complete only EOS remains, so the sequence
ends with finish_reason "stop". A constraint that max_tokens cuts ends "length".

Bounds (each refused with a 400 naming the field): the schema's JSON at most
``MAX_SCHEMA_BYTES``, nesting at most ``MAX_DEPTH``, at most ``MAX_TOOLS`` tools, and the
compile itself under llguidance's fuel limits (``LIMITS``) — a deterministic bound on its
work — checked against ``MAX_COMPILE_S``. Compiled grammars are cached by the constraint's
hash; each sequence gets a ``deep_copy`` of the cached matcher (microseconds).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from typing import Any

import numpy as np

from lastmile.runtime.generation.types import InvalidSamplingParams

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_TOOLS = 128
MAX_COMPILE_S = 2.0
CACHE_SIZE = 64
KINDS = ("json_object", "json_schema", "tool_call")


class ConstraintError(InvalidSamplingParams):
    """A constraint that cannot be compiled or is past a bound (HTTP 400, ``field`` names it;
    an ``InvalidSamplingParams``, so the runner's refusal carries the field to the daemon)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def __reduce__(self):  # crosses the runner pipe intact
        return (_rebuild, (self.field, str(self)))


def _rebuild(field: str, text: str) -> ConstraintError:
    exc = ConstraintError(field, "")
    exc.args = (text,)
    return exc


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, stopping past ``limit`` (no recursion: a hostile schema
    nested 100,000 deep must not blow the stack)."""
    best, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if d > best:
            best = d
            if best > limit:
                return best
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
    return best


def check_bounds(constraint: dict[str, Any]) -> None:
    """The bounds both sides check (the API before a request goes to the runner)."""
    kind = constraint.get("kind")
    field = constraint.get("field") or ("tools" if kind == "tool_call" else "response_format")
    if kind not in KINDS:
        raise ConstraintError(field, f"unknown constraint kind {kind!r}")
    if kind == "tool_call":
        tools = constraint.get("tools")
        if not isinstance(tools, list) or not tools:
            raise ConstraintError(field, "at least one tool is needed")
        if len(tools) > MAX_TOOLS:
            raise ConstraintError(field, f"at most {MAX_TOOLS} tools, got {len(tools)}")
        body: Any = tools
    else:
        body = constraint.get("schema", {})
    try:
        size = len(json.dumps(body, separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConstraintError(field, f"not JSON: {exc}") from None
    if size > MAX_SCHEMA_BYTES:
        raise ConstraintError(field, f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES}")
    if depth(body) > MAX_DEPTH:
        raise ConstraintError(field, f"the schema nests deeper than {MAX_DEPTH} levels")


def schema_of(constraint: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema the output must match."""
    kind = constraint["kind"]
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = constraint.get("schema")
        if not isinstance(schema, dict):
            raise ConstraintError(constraint.get("field") or "response_format", "the schema must be an object")
        return schema
    calls = []
    for tool in constraint["tools"]:
        params = tool.get("parameters") or {"type": "object", "properties": {}}
        if isinstance(params, dict) and params.get("type") == "object" and "properties" in params \
                and "additionalProperties" not in params:
            # a function takes its declared parameters: arguments beyond them are closed off
            # (as OpenAI's strict mode does; the ollama package drops additionalProperties)
            params = {**params, "additionalProperties": False}
        calls.append({"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


class SeqConstraint:
    """One sequence's matcher: ``allowed()`` before choosing, ``consume(tok)`` after."""

    __slots__ = ("matcher", "n_vocab", "eos", "_eos_idx")

    def __init__(self, matcher: Any, n_vocab: int, eos: frozenset[int]) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.eos = eos
        self._eos_idx = np.fromiter(sorted(t for t in eos if t < n_vocab), dtype=np.int64)

    def allowed(self, width: int) -> np.ndarray:
        """A bool mask of ``width`` entries (the logits row's): True where the token may come."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:width].astype(bool)
        if mask.shape[0] < width:
            mask = np.concatenate([mask, np.zeros(width - mask.shape[0], dtype=bool)])
        accepting = self.matcher.is_accepting() or self.matcher.is_stopped()
        if self._eos_idx.size:
            mask[self._eos_idx[self._eos_idx < width]] = accepting
        if not mask.any():  # the grammar is in an error state: end the sequence honestly
            raise RuntimeError(f"constraint: no token allowed ({self.matcher.get_error() or 'dead end'})")
        return mask

    def mask_numpy(self, row: np.ndarray) -> np.ndarray:
        """A copy of a logits row with -inf outside the allowed tokens."""
        out = np.where(self.allowed(row.shape[-1]), row, np.float32(-np.inf)).astype(np.float32, copy=False)
        return out

    def mask_torch(self, row: Any) -> Any:
        import torch

        allowed = torch.from_numpy(self.allowed(row.shape[-1]))
        return row.float().masked_fill(~allowed.to(row.device), float("-inf"))

    def consume(self, tok: int) -> None:
        if tok in self.eos:
            return
        if not self.matcher.consume_token(int(tok)):
            raise RuntimeError(f"constraint: token {tok} refused ({self.matcher.get_error()})")


class ConstraintCompiler:
    """Compiles constraints for one tokenizer; compiled matchers cached by the constraint's hash."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], n_vocab: int | None = None) -> None:
        self.hf_tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.n_vocab = int(n_vocab or len(tokenizer))
        self._lltok: Any = None
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.compiled_total = 0
        self.cache_hits = 0
        self.compile_s_max = 0.0

    def _tokenizer(self) -> Any:
        if self._lltok is None:
            import llguidance.hf

            eos = sorted(self.eos) or None
            self._lltok = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=max(self.n_vocab, len(self.hf_tokenizer)),
                                                       eos_token=eos[0] if eos and len(eos) == 1 else eos)
        return self._lltok

    def compile(self, constraint: dict[str, Any]) -> SeqConstraint:
        """A fresh per-sequence matcher; raises ``ConstraintError`` naming the field."""
        import llguidance

        check_bounds(constraint)
        field = constraint.get("field") or ("tools" if constraint.get("kind") == "tool_call" else "response_format")
        key = hashlib.sha256(json.dumps(constraint, sort_keys=True, default=str).encode()).hexdigest()
        base = self._cache.get(key)
        if base is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
        else:
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    schema_of(constraint), defaults={"whitespace_flexible": False})
            except ConstraintError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the library raises for a schema is the client's 400
                raise ConstraintError(field, f"not a JSON schema the grammar library takes: {exc}") from None
            lltok = self._tokenizer()  # once per model (about 1 s for a 49k vocabulary), not the compile's time
            t0 = time.monotonic()
            try:
                base = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=LIMITS())
            except Exception as exc:  # noqa: BLE001 - documented as "never raises"; if it does, still a 400
                raise ConstraintError(field, f"the grammar library cannot compile this schema: {exc}") from None
            took = time.monotonic() - t0
            self.compile_s_max = max(self.compile_s_max, took)
            if base.is_error():
                raise ConstraintError(field, f"the grammar library cannot compile this schema: {base.get_error()[:300]}")
            if took > MAX_COMPILE_S:
                raise ConstraintError(field, f"the schema took {took:.1f} s to compile; at most {MAX_COMPILE_S:g} s")
            self.compiled_total += 1
            self._cache[key] = base
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return SeqConstraint(base.deep_copy(), self.n_vocab, self.eos)

    def stats(self) -> dict[str, Any]:
        return {"constraints_compiled": self.compiled_total, "constraint_cache_hits": self.cache_hits,
                "constraint_compile_s_max": round(self.compile_s_max, 4)}


def LIMITS() -> Any:  # noqa: N802 - a constant built lazily (llguidance imported on first use)
    """llguidance's fuel limits for a compile: about 0.5 s of lexer work and a bounded grammar."""
    import llguidance

    return llguidance.LLParserLimits(initial_lexer_fuel=20_000_000, max_grammar_size=200_000,
                                      step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)


#: The generic tool format, for a chat template without a tools section: one system message.
GENERIC_TOOLS_PROMPT = (
    "You can call these tools (JSON Schema of each one's arguments):\n{tools}\n"
    "To call a tool, answer with one JSON object and nothing else: "
    '{{"name": <the tool\'s name>, "arguments": {{...}}}}'
)


def render_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the generic tools system message first (merged into a leading system
    message when there is one)."""
    listing = json.dumps([{"name": t.get("name"), "description": t.get("description", ""),
                           "parameters": t.get("parameters") or {"type": "object"}} for t in tools],
                         separators=(",", ":"))
    text = GENERIC_TOOLS_PROMPT.format(tools=listing)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = out[0]["content"] + "\n\n" + text
        return out
    return [{"role": "system", "content": text}, *out]
