"""The generation contract shared by the engine (runner) side and the API (daemon) side.

Everything here is plain, frozen data so that it crosses the runner protocol (pickled) and
the HTTP layer unchanged. Names are fixed by the contract: extend with fields, never rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Finish reasons a stream may end with.
FINISH_REASONS = ("stop", "length", "timeout")

#: The seed range every engine takes: ORT-GenAI's ``set_search_options(random_seed=...)`` casts
#: to a C++ int32 and raises for anything outside [-2**31, 2**31 - 1] (checked with
#: onnxruntime-genai 0.18: 2**31 and -2**31 - 1 raise "Unable to cast Python instance"); torch's
#: ``Generator.manual_seed`` takes more, so the narrower range is the contract.
SEED_MIN = -(2**31)
SEED_MAX = 2**31 - 1
#: The smallest top_p: below float32's normal range a nucleus rounds to 0 and the torch sampler
#: masks every token (softmax of all -inf is NaN, ``torch.multinomial`` raises). Any nucleus
#: smaller than this is the most likely token alone anyway.
MIN_TOP_P = 1e-6
#: top_k beyond any vocabulary; the daemon also refuses top_k above the model's vocab_size
#: (ORT-GenAI raises "top_k must be less than or equal to vocab_size").
MAX_TOP_K = 1_000_000
MAX_TEMPERATURE = 100.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen and when generation ends."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0.0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them, text excludes them

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` with the field name (``exc.field``) for a bad value, so both
        sides reject the same inputs with the same words. Every bound is one the engines
        really have (see the constants above); ``vocab_size``, when known, bounds top_k."""
        def bad(name: str, msg: str) -> None:
            exc = InvalidSamplingParams(f"{name}: {msg}")
            exc.field = name
            raise exc

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_finite(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            bad("temperature", f"must be a finite number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not _is_finite(self.top_p) or not MIN_TOP_P <= self.top_p <= 1.0:
            bad("top_p", f"must be a number in [{MIN_TOP_P:g}, 1], got {self.top_p!r}")
        top_k_max = min(MAX_TOP_K, vocab_size) if vocab_size else MAX_TOP_K
        if not _is_int(self.top_k) or not 0 <= self.top_k <= top_k_max:
            where = f" (this model's vocabulary has {vocab_size} tokens)" if vocab_size else ""
            bad("top_k", f"must be an integer from 0 to {top_k_max}{where}, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            bad("seed", f"must be an integer from {SEED_MIN} to {SEED_MAX} (32 bits) or null, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or len(self.stop) > 16 \
                or any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
            bad("stop", "at most 16 non-empty strings of at most 256 characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; ``field`` names it (HTTP 400)."""

    field: str = ""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: exactly one of ``prompt``, ``messages``, ``prompt_token_ids``."""

    params: SamplingParams
    prompt: str | None = None  # completion-style text
    messages: tuple[dict[str, str], ...] | None = None  # chat: rendered in the runner with the folder's chat template
    prompt_token_ids: tuple[int, ...] | None = None  # pre-tokenized
    deadline_s: float | None = None  # seconds from submission; past it: finish_reason "timeout"
    #: constrained decoding (runtime/generation/constraints.py): {"kind": "json_object"} |
    #: {"kind": "json_schema", "schema": {...}} | {"kind": "tool_call", "tools": [{"name", "parameters"}]},
    #: with "field" naming the request field a refusal names; None: free text
    constraint: dict | None = None
    #: the request's tools ({"name", "description", "parameters"}), rendered into the prompt by the
    #: chat template when it has a tools section, else by the generic format (constraints.py)
    tools: tuple[dict, ...] | None = None

    def input_field(self) -> str:
        """The request field that carries the prompt ("prompt" / "messages" /
        "prompt_token_ids"); raises ``InvalidSamplingParams`` unless exactly one is set."""
        given = [
            n for n, v in (("prompt", self.prompt), ("messages", self.messages),
                           ("prompt_token_ids", self.prompt_token_ids)) if v is not None
        ]
        if len(given) != 1:
            exc = InvalidSamplingParams(
                "exactly one of prompt, messages, prompt_token_ids must be given"
                f" (got {', '.join(given) or 'none'})")
            exc.field = given[1] if len(given) > 1 else "prompt"
            raise exc
        return given[0]


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of a stream. The last chunk has ``finish_reason`` set (and may carry text)."""

    text: str  # text new since the previous chunk (incremental detokenization; stop strings cut)
    token_ids: tuple[int, ...]  # token ids new since the previous chunk
    finish_reason: str | None  # None while running; then "stop" | "length" | "timeout"
    prompt_tokens: int
    completion_tokens: int  # total so far


class ContextOverflow(ValueError):
    """prompt + max_tokens > the model's max_context: HTTP 400 with the counts. ``field`` is
    "max_tokens" when the prompt alone fits, else the prompt's field ("messages"/"prompt")."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_context: int, field: str) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} > this model's max_context {max_context}; "
            + ("lower max_tokens" if field == "max_tokens" else "shorten the prompt")
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_context = max_context
        self.field = field

    def __reduce__(self):  # crosses the runner pipe intact
        return (ContextOverflow, (self.prompt_tokens, self.max_tokens, self.max_context, self.field))


class InvalidGenerationTarget(ValueError):
    """The named model is not a generation model (HTTP 400, field "model")."""

    field = "model"


@dataclass(frozen=True, slots=True)
class Accepted:
    """The runner's first answer to a generation: the prompt fits and is queued."""

    prompt_tokens: int
    extra: dict = field(default_factory=dict)
