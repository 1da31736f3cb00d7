"""The generation contract shared by the engine (runner) side and the API (daemon) side.

Everything here is plain, frozen data so that it crosses the runner protocol (pickled) and
the HTTP layer unchanged. Names are fixed by the contract: extend with fields, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Finish reasons a stream may end with.
FINISH_REASONS = ("stop", "length", "timeout")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen and when generation ends."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0.0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them, text excludes them

    def validate(self) -> None:
        """Raise ``ValueError`` with the field name (``exc.field``) for a bad value, so both
        sides reject the same inputs with the same words."""
        def bad(name: str, msg: str) -> None:
            exc = InvalidSamplingParams(f"{name}: {msg}")
            exc.field = name
            raise exc

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            bad("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer or null, got {self.seed!r}")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
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
