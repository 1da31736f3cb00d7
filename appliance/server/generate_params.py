"""Request bodies of the generation APIs -> :class:`GenerationRequest`, strictly.

One parser per wire format (OpenAI chat and completions, Triton's generate extension, Ollama's
chat and generate), all built from the same field checks, so a bad ``temperature`` is refused
with the same words whichever API it came through. Every refusal is a :class:`ParamError`
naming the field (HTTP 400); nothing here allocates beyond what the (size-limited) body
already holds, and every list a client sends is bounded before it is walked.

Why strict (unknown keys refused, unsupported options refused unless they ask for the default):
an OpenAI client that sends ``logprobs: true`` or ``tools`` and gets a plain answer back would
silently believe the server honoured them. OpenAI itself refuses unknown arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

# Bounds on what one request may carry. They are far above any model's context (a token is
# >= 1 character), so they only refuse bodies that could never fit, before any work is done.
MAX_MODEL_NAME = 256
MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 1_000_000  # all messages (or the prompt) together
MAX_PROMPT_TOKEN_IDS = 262_144
MAX_TOKEN_ID = 2**31 - 1
MAX_NEW_TOKENS = 1_048_576
MAX_STOP = 16  # the contract's bound (SamplingParams.validate)
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_TOP_K = 1_000_000
MAX_DEADLINE_S = 86_400.0
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens
CHAT_ROLES = ("system", "developer", "user", "assistant")


class ParamError(ValueError):
    """One field of the request is wrong (HTTP 400 naming ``field``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What a route needs from a body: the model, the generation, and how to answer."""

    model: str
    request: GenerationRequest
    stream: bool
    include_usage: bool = False
    id: str | None = None  # Triton's optional request id, echoed back


# --- field checks ------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def model_name(body: dict[str, Any], field: str = "model") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ParamError(field, "required: the name of a loaded generation model (see GET /v1/models)")
    if len(value) > MAX_MODEL_NAME:
        raise ParamError(field, f"at most {MAX_MODEL_NAME} characters")
    return value


def boolean(body: dict[str, Any], field: str, default: bool = False) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ParamError(field, f"must be true or false, got {value!r}")
    return value


def int_in(body: dict[str, Any], field: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # JSON 16.0 from some clients
        value = int(value)
    if not _is_int(value) or not low <= value <= high:
        raise ParamError(field, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def number_in(body: dict[str, Any], field: str, low: float, high: float, default: float, *, low_open: bool = False) -> float:
    value = body.get(field)
    if value is None:
        return default
    ok = _is_number(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ParamError(field, f"must be a number in {interval}, got {value!r}")
    return float(value)


def stop_strings(body: dict[str, Any], field: str = "stop") -> tuple[str, ...]:
    """``stop``: a string or a list of strings (OpenAI allows both), bounded in count and size."""
    value = body.get(field)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ParamError(field, f"must be a string or a list of strings, got {type(value).__name__}")
    if len(items) > MAX_STOP:
        raise ParamError(field, f"at most {MAX_STOP} stop strings, got {len(items)}")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > MAX_STOP_CHARS:
            raise ParamError(field, f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(items))  # order kept, duplicates dropped


def only_default(body: dict[str, Any], field: str, allowed: tuple[Any, ...], why: str) -> None:
    """An option Lastmile does not implement: accepted only when it asks for the default."""
    if field in body and body[field] not in allowed:
        raise ParamError(field, f"not supported by this server ({why})")


def refuse_unknown(body: dict[str, Any], known: frozenset[str], where: str = "") -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        name = f"{where}{unknown[0]}"
        raise ParamError(name, f"unknown field (this endpoint takes: {', '.join(sorted(known))})")


def sampling(body: dict[str, Any], prefix: str = "", *, max_tokens_fields: tuple[str, ...] = ("max_tokens",),
             stop_field: str = "stop") -> SamplingParams:
    """The sampling fields shared by every API. ``max_tokens_fields``: the names a client may
    use for the budget of new tokens (the first one given wins; OpenAI's chat has two)."""
    max_tokens = None
    for name in max_tokens_fields:
        value = int_in(body, name, 1, MAX_NEW_TOKENS, None) if name in body else None
        if value is not None and max_tokens is None:
            max_tokens = value
    top_k = int_in(body, "top_k", -1, MAX_TOP_K, 0)
    params = SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=number_in(body, "temperature", 0.0, MAX_TEMPERATURE, 1.0),
        top_p=number_in(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
        top_k=0 if top_k in (None, -1) else top_k,  # -1: "off" for vLLM-style clients
        seed=int_in(body, "seed", -MAX_SEED - 1, MAX_SEED, None),
        stop=stop_strings(body, stop_field),
    )
    try:
        params.validate()  # the contract's own checks: both sides refuse the same inputs
    except ValueError as exc:
        raise ParamError(prefix + getattr(exc, "field", "parameters"), str(exc)) from None
    return params


def stream_options(body: dict[str, Any], stream: bool) -> bool:
    """``stream_options.include_usage``; the object only makes sense with ``stream: true``."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ParamError("stream_options", "only allowed when stream is true")
    if not isinstance(options, dict):
        raise ParamError("stream_options", "must be an object like {\"include_usage\": true}")
    refuse_unknown(options, frozenset({"include_usage", "include_obfuscation"}), "stream_options.")
    only_default(options, "include_obfuscation", (None, False), "no obfuscation padding is sent")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise ParamError("stream_options.include_usage", f"must be true or false, got {value!r}")
    return value


def _text_content(content: Any, field: str) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text": ...}``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if len(content) > MAX_MESSAGES:
            raise ParamError(field, f"at most {MAX_MESSAGES} content parts")
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ParamError(f"{field}[{i}]", "only text parts ({\"type\": \"text\", \"text\": \"...\"}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ParamError(field, "must be a string or a list of text parts")


def messages(body: dict[str, Any], field: str = "messages") -> tuple[dict[str, str], ...]:
    value = body.get(field)
    if not isinstance(value, list) or not value:
        raise ParamError(field, "required: a non-empty list of {\"role\", \"content\"} objects")
    if len(value) > MAX_MESSAGES:
        raise ParamError(field, f"at most {MAX_MESSAGES} messages, got {len(value)}")
    out, total = [], 0
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ParamError(where, "must be an object with role and content")
        refuse_unknown(message, frozenset({"role", "content", "name"}), f"{where}.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ParamError(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = _text_content(message.get("content"), f"{where}.content")
        total += len(content)
        if total > MAX_CONTENT_CHARS:
            raise ParamError(field, f"the messages hold more than {MAX_CONTENT_CHARS} characters")
        entry = {"role": "system" if role == "developer" else role, "content": content}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str) or len(name) > MAX_MODEL_NAME:
                raise ParamError(f"{where}.name", f"must be a string of at most {MAX_MODEL_NAME} characters")
            entry["name"] = name
        out.append(entry)
    return tuple(out)


def required_text(body: dict[str, Any], field: str) -> str:
    """A required non-empty string field, bounded like every text the daemon tokenizes."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ParamError(field, "required: a non-empty string")
    if len(value) > MAX_CONTENT_CHARS:
        raise ParamError(field, f"at most {MAX_CONTENT_CHARS} characters")
    return value


def prompt_of(body: dict[str, Any], field: str = "prompt") -> tuple[str | None, tuple[int, ...] | None]:
    """OpenAI's ``prompt``: a string, a list of one string, or a list of token ids (one prompt:
    ``n``/batched prompts are not served, see the README)."""
    value = body.get(field)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ParamError(field, "must not be empty")
        if len(value) > MAX_CONTENT_CHARS:
            raise ParamError(field, f"at most {MAX_CONTENT_CHARS} characters")
        return value, None
    if isinstance(value, list) and value:
        if len(value) > MAX_PROMPT_TOKEN_IDS:
            raise ParamError(field, f"at most {MAX_PROMPT_TOKEN_IDS} token ids")
        if all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in value):
            return None, tuple(value)
        raise ParamError(field, "a list must be one prompt of token ids (integers >= 0); several prompts in one request are not supported")
    raise ParamError(field, "required: a non-empty string (or a list of token ids)")


# --- OpenAI ------------------------------------------------------------------------------

_CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "n", "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs",
    "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "response_format", "store", "metadata",
    "service_tier", "modalities", "reasoning_effort", "timeout_s",
})
_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "best_of", "stream",
    "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs", "logit_bias", "echo", "suffix",
    "timeout_s",
})


def _openai_common(body: dict[str, Any]) -> None:
    only_default(body, "n", (None, 1), "one choice per request; send several requests for more")
    only_default(body, "frequency_penalty", (None, 0, 0.0), "penalties are not implemented")
    only_default(body, "presence_penalty", (None, 0, 0.0), "penalties are not implemented")
    only_default(body, "logit_bias", (None, {}), "logit_bias is not implemented")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_MODEL_NAME):
        raise ParamError("user", f"must be a string of at most {MAX_MODEL_NAME} characters")


def deadline(body: dict[str, Any], field: str = "timeout_s") -> float | None:
    """Lastmile's extension: seconds the whole generation may take (finish_reason "timeout")."""
    value = body.get(field)
    return None if value is None else number_in(body, field, 0.0, MAX_DEADLINE_S, 0.0, low_open=True)


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    """``POST /v1/chat/completions``."""
    refuse_unknown(body, _CHAT_FIELDS)
    model = model_name(body)
    msgs = messages(body)
    _openai_common(body)
    only_default(body, "logprobs", (None, False), "log-probabilities are not returned")
    only_default(body, "top_logprobs", (None, 0), "log-probabilities are not returned")
    only_default(body, "tools", (None, []), "tool calling is not implemented")
    only_default(body, "tool_choice", (None, "none"), "tool calling is not implemented")
    only_default(body, "parallel_tool_calls", (None, False, True), "tool calling is not implemented")
    only_default(body, "response_format", (None, {"type": "text"}), "only text responses")
    only_default(body, "store", (None, False), "completions are not stored")
    only_default(body, "modalities", (None, ["text"]), "text only")
    only_default(body, "service_tier", (None, "auto", "default"), "one service tier")
    only_default(body, "reasoning_effort", (None,), "not a reasoning model API")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ParamError("metadata", "must be an object")
    stream = boolean(body, "stream")
    params = sampling(body, max_tokens_fields=("max_completion_tokens", "max_tokens"))
    request = GenerationRequest(params=params, messages=msgs, deadline_s=deadline(body))
    return ParsedRequest(model, request, stream, stream_options(body, stream))


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    """``POST /v1/completions``."""
    refuse_unknown(body, _COMPLETION_FIELDS)
    model = model_name(body)
    prompt, token_ids = prompt_of(body)
    _openai_common(body)
    only_default(body, "best_of", (None, 1), "one candidate per request")
    only_default(body, "logprobs", (None, 0), "log-probabilities are not returned")
    only_default(body, "echo", (None, False), "the prompt is not echoed")
    only_default(body, "suffix", (None, ""), "insertion (suffix) is not implemented")
    stream = boolean(body, "stream")
    params = sampling(body)
    request = GenerationRequest(params=params, prompt=prompt, prompt_token_ids=token_ids, deadline_s=deadline(body))
    return ParsedRequest(model, request, stream, stream_options(body, stream))


# --- Triton's generate extension ------------------------------------------------------------

_TRITON_PARAMETERS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_words", "bad_words",
                                "stream", "timeout_s"})


def parse_triton(body: dict[str, Any], model: str, *, stream: bool) -> ParsedRequest:
    """``POST /v2/models/{name}/generate[_stream]``: ``text_input`` plus sampling parameters,
    either in ``parameters`` or at the top level (TensorRT-LLM's examples put them there)."""
    refuse_unknown(body, frozenset({"id", "text_input", "parameters"}) | _TRITON_PARAMETERS)
    text = required_text(body, "text_input")
    request_id = body.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_MODEL_NAME):
        raise ParamError("id", f"must be a string of at most {MAX_MODEL_NAME} characters")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ParamError("parameters", "must be an object")
    refuse_unknown(parameters, _TRITON_PARAMETERS, "parameters.")
    top = {k: v for k, v in body.items() if k in _TRITON_PARAMETERS}
    both = sorted(set(top) & set(parameters))
    if both:
        raise ParamError(f"parameters.{both[0]}", "given both at the top level and in parameters")
    merged = {**top, **parameters}
    prefix = "parameters." if parameters else ""
    if merged.get("stop_words") in ("", []):  # TensorRT-LLM's examples send "" for "none"
        del merged["stop_words"]
    try:
        only_default(merged, "bad_words", (None, "", []), "bad_words is not implemented")
        if "stop" in merged and "stop_words" in merged:
            raise ParamError("stop_words", "give stop or stop_words, not both")
        if boolean(merged, "stream", stream) != stream:
            raise ParamError("stream", "use /generate_stream to stream and /generate for one answer")
        params = sampling(merged, prefix, stop_field="stop_words" if "stop_words" in merged else "stop")
        limit = deadline(merged)
    except ParamError as exc:
        if not exc.field.startswith(prefix):
            raise ParamError(prefix + exc.field, exc.message.split(": ", 1)[1]) from None
        raise
    return ParsedRequest(model, GenerationRequest(params=params, prompt=text, deadline_s=limit), stream, id=request_id)


# --- Ollama --------------------------------------------------------------------------------

#: Ollama's ``options`` Lastmile implements (the rest are refused, naming them).
_OLLAMA_OPTIONS = frozenset({"num_predict", "temperature", "top_p", "top_k", "seed", "stop"})
_OLLAMA_COMMON = frozenset({"model", "stream", "options", "format", "keep_alive", "think"})


def ollama_model(body: dict[str, Any]) -> str:
    """Ollama names carry a tag (``name:latest``); a store name has none."""
    name = model_name(body)
    return name[: -len(":latest")] if name.endswith(":latest") else name


def _ollama_options(body: dict[str, Any]) -> SamplingParams:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ParamError("options", "must be an object")
    unknown = sorted(k for k in options if k not in _OLLAMA_OPTIONS)
    if unknown:
        raise ParamError(f"options.{unknown[0]}", "not supported by this server (supported: " + ", ".join(sorted(_OLLAMA_OPTIONS))
                         + "; the context size is the model's max_context load setting)")
    mapped = {k: v for k, v in options.items() if k != "num_predict"}
    num_predict = options.get("num_predict")
    if num_predict is not None and num_predict not in (-1, -2):  # -1/-2: "until the end": the server's default
        mapped["max_tokens"] = num_predict
    try:
        return sampling(mapped)
    except ParamError as exc:
        name = "num_predict" if exc.field == "max_tokens" else exc.field
        raise ParamError(f"options.{name}", exc.message.split(": ", 1)[1]) from None


def _ollama_common(body: dict[str, Any]) -> bool:
    only_default(body, "format", (None, ""), "structured output (format) is not implemented")
    only_default(body, "think", (None, False), "not a reasoning model API")
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not isinstance(keep_alive, (str, int, float)):
        raise ParamError("keep_alive", "must be a duration like \"5m\" or a number of seconds")
    return boolean(body, "stream", True)  # Ollama streams unless told not to


def parse_ollama_chat(body: dict[str, Any]) -> ParsedRequest:
    """``POST /api/chat``: ``messages`` through the chat template; NDJSON stream by default."""
    refuse_unknown(body, _OLLAMA_COMMON | {"messages", "tools"})
    model = ollama_model(body)
    only_default(body, "tools", (None, []), "tool calling is not implemented")
    value = body.get("messages")
    if isinstance(value, list):
        for i, m in enumerate(value):
            if isinstance(m, dict) and m.get("images"):
                raise ParamError(f"messages[{i}].images", "images are not supported (text models only)")
        value = [{k: v for k, v in m.items() if k != "images"} if isinstance(m, dict) else m for m in value]
    msgs = messages({"messages": value})
    stream = _ollama_common(body)
    return ParsedRequest(model, GenerationRequest(params=_ollama_options(body), messages=msgs), stream)


def parse_ollama_generate(body: dict[str, Any]) -> ParsedRequest:
    """``POST /api/generate``: ``prompt`` (with ``system``) through the chat template, or as is
    with ``raw: true``."""
    refuse_unknown(body, _OLLAMA_COMMON | {"prompt", "system", "raw", "suffix", "template", "context", "images"})
    model = ollama_model(body)
    only_default(body, "suffix", (None, ""), "insertion (suffix) is not implemented")
    only_default(body, "template", (None, ""), "the model folder's chat template is used")
    only_default(body, "context", (None, []), "send the conversation as /api/chat messages instead")
    only_default(body, "images", (None, []), "images are not supported (text models only)")
    prompt = required_text(body, "prompt")
    system = body.get("system")
    if system is not None and (not isinstance(system, str) or len(system) > MAX_CONTENT_CHARS):
        raise ParamError("system", f"must be a string of at most {MAX_CONTENT_CHARS} characters")
    raw = boolean(body, "raw")
    stream = _ollama_common(body)
    params = _ollama_options(body)
    if raw:
        if system:
            raise ParamError("system", "a raw prompt takes no system message (put it in the prompt)")
        request = GenerationRequest(params=params, prompt=prompt)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        request = GenerationRequest(params=params, messages=tuple(msgs))
    return ParsedRequest(model, request, stream)
