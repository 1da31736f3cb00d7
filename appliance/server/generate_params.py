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

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from lastmile.runtime.generation.constraints import MAX_TOOLS, ConstraintError, check_bounds
from lastmile.runtime.generation.types import (MAX_TOP_K, MIN_TOP_P, SEED_MAX, SEED_MIN, GenerationRequest,
                                               SamplingParams)

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
MAX_SEED = SEED_MAX  # the 32-bit range every engine takes (types.SEED_MIN..SEED_MAX)
MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_DEADLINE_S = 86_400.0
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name


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
    prompt_bytes: int = 0  # UTF-8 bytes of the prompt text (all messages' contents), for the daemon's token bound
    param_prefix: str = ""  # where this API keeps the sampling fields ("parameters.", "options."), for error fields
    keep_alive: float | None = None  # Ollama's keep_alive in seconds (0: unload after this request)
    #: how the answer is read: "" text; "call": the output is a constrained tool call
    #: ({"name", "arguments"}) answered as tool_calls; "auto": text, unless it parses as a call
    tool_answer: str = ""


# --- field checks ------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def utf8_size(value: str, field: str) -> int:
    """The UTF-8 length of a text the runner will tokenize; a lone surrogate (JSON ``"\\ud800"``
    decodes to one) cannot be encoded, so the tokenizer would fail on it: refused here."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ParamError(field, f"is not valid Unicode text: a lone surrogate (U+{ord(value[exc.start]):04X}) at "
                                f"character {exc.start}") from None


def model_name(body: dict[str, Any], field: str = "model") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ParamError(field, "required: the name of a loaded generation model (see GET /v1/models)")
    if len(value) > MAX_MODEL_NAME:
        raise ParamError(field, f"at most {MAX_MODEL_NAME} characters")
    utf8_size(value, field)
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
        utf8_size(item, field)
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
        top_p=number_in(body, "top_p", MIN_TOP_P, 1.0, 1.0),
        top_k=0 if top_k in (None, -1) else top_k,  # -1: "off" for vLLM-style clients
        seed=int_in(body, "seed", SEED_MIN, SEED_MAX, None),
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
    return messages_sized(body, field)[0]


def messages_sized(body: dict[str, Any], field: str = "messages") -> tuple[tuple[dict[str, str], ...], int]:
    """The messages and the UTF-8 bytes of their contents together."""
    value = body.get(field)
    if not isinstance(value, list) or not value:
        raise ParamError(field, "required: a non-empty list of {\"role\", \"content\"} objects")
    if len(value) > MAX_MESSAGES:
        raise ParamError(field, f"at most {MAX_MESSAGES} messages, got {len(value)}")
    out, total, size = [], 0, 0
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ParamError(where, "must be an object with role and content")
        refuse_unknown(message, frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "tool_name"}), f"{where}.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ParamError(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        calls = message.get("tool_calls")
        if calls is not None and role != "assistant":
            raise ParamError(f"{where}.tool_calls", "only an assistant message carries tool_calls")
        if calls and message.get("content") is None:
            content = ""
        else:
            content = _text_content(message.get("content"), f"{where}.content")
        if calls:
            content = (content + "\n" if content else "") + _calls_text(calls, f"{where}.tool_calls")
        total += len(content)
        if total > MAX_CONTENT_CHARS:
            raise ParamError(field, f"the messages hold more than {MAX_CONTENT_CHARS} characters")
        size += utf8_size(content, f"{where}.content")
        entry = {"role": "system" if role == "developer" else role, "content": content}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str) or len(name) > MAX_MODEL_NAME:
                raise ParamError(f"{where}.name", f"must be a string of at most {MAX_MODEL_NAME} characters")
            utf8_size(name, f"{where}.name")
            entry["name"] = name
        out.append(entry)
    return tuple(out), size


def _calls_text(calls: Any, field: str) -> str:
    """An assistant's tool calls (OpenAI: arguments a JSON string; Ollama: an object) as the
    text the model would have produced: one ``{"name", "arguments"}`` object per line."""
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise ParamError(field, f"must be a list of at most {MAX_TOOLS} calls")
    lines = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ParamError(f"{field}[{i}]", 'must be {"type": "function", "function": {"name", "arguments"}}')
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise ParamError(f"{field}[{i}].function.arguments", "must be a JSON object (as a string)") from None
        if not isinstance(args, dict):
            raise ParamError(f"{field}[{i}].function.arguments", "must be a JSON object")
        lines.append(json.dumps({"name": fn["name"], "arguments": args}, separators=(",", ":")))
    return "\n".join(lines)


def tools_of(body: dict[str, Any], field: str = "tools") -> tuple[dict[str, Any], ...] | None:
    """OpenAI's (and Ollama's) ``tools``: ``[{"type": "function", "function": {"name",
    "description", "parameters"}}]`` -> ``({"name", "description", "parameters"}, ...)``."""
    value = body.get(field)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise ParamError(field, 'must be a list of {"type": "function", "function": {...}}')
    if len(value) > MAX_TOOLS:
        raise ParamError(field, f"at most {MAX_TOOLS} tools, got {len(value)}")
    out, names = [], set()
    for i, tool in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise ParamError(where, 'must be {"type": "function", "function": {"name", "parameters"}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ParamError(f"{where}.function.name", "1 to 64 characters of a-z, A-Z, 0-9, _ and -")
        if name in names:
            raise ParamError(f"{where}.function.name", f"{name!r} is named twice")
        names.add(name)
        params = fn.get("parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(params, dict):
            raise ParamError(f"{where}.function.parameters", "must be a JSON schema object")
        desc = fn.get("description") or ""
        if not isinstance(desc, str) or len(desc) > 8192:
            raise ParamError(f"{where}.function.description", "must be a string of at most 8192 characters")
        out.append({"name": name, "description": desc, "parameters": params})
    _bounded({"kind": "tool_call", "tools": out, "field": field})
    return tuple(out)


def _bounded(constraint: dict[str, Any]) -> dict[str, Any]:
    try:
        check_bounds(constraint)
    except ConstraintError as exc:
        raise ParamError(exc.field, str(exc).split(": ", 1)[-1]) from None
    return constraint


def tool_constraint(body: dict[str, Any], tools: tuple[dict[str, Any], ...] | None,
                    field: str = "tool_choice") -> tuple[dict[str, Any] | None, str]:
    """``tool_choice`` -> (the constraint, how the answer is read). "none": the tools are in
    the prompt, the answer is text; "auto" (the default with tools): free text, answered as a
    call when the whole output parses as one (not constrained: see docs/generation.md);
    "required": one call of any tool, constrained; ``{"type": "function", "function":
    {"name"}}``: one call of that tool, constrained."""
    choice = body.get(field)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ParamError(field, "needs tools")
        return None, ""
    if choice in (None, "auto"):
        return None, "auto"
    if choice == "none":
        return None, ""
    if choice == "required":
        return {"kind": "tool_call", "tools": list(tools), "field": "tools"}, "call"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        picked = [t for t in tools if t["name"] == name]
        if not picked:
            raise ParamError(f"{field}.function.name", f"{name!r} is not one of the tools")
        return {"kind": "tool_call", "tools": picked, "field": "tools"}, "call"
    raise ParamError(field, 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


def response_format(body: dict[str, Any], field: str = "response_format") -> dict[str, Any] | None:
    """OpenAI's ``response_format``: text (None), ``{"type": "json_object"}`` or ``{"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}`` -> a constraint."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ParamError(field, 'must be an object like {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"kind": "json_object", "field": field}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ParamError(f"{field}.json_schema", 'required: {"name", "schema", "strict"}')
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ParamError(f"{field}.json_schema.schema", "required: a JSON schema object")
        return _bounded({"kind": "json_schema", "schema": schema, "field": field})
    raise ParamError(f"{field}.type", f'must be "text", "json_object" or "json_schema", got {kind!r}')


def ollama_format(body: dict[str, Any], field: str = "format") -> dict[str, Any] | None:
    """Ollama's ``format``: "json" or a JSON schema object -> a constraint."""
    value = body.get(field)
    if value in (None, ""):
        return None
    if value == "json":
        return {"kind": "json_object", "field": field}
    if isinstance(value, dict):
        return _bounded({"kind": "json_schema", "schema": value, "field": field})
    raise ParamError(field, f'must be "json" or a JSON schema object, got {value!r}')


def _no_stop_with(params: SamplingParams, constraint: dict[str, Any] | None, field: str) -> None:
    """A stop string could cut a constrained answer short and still say "stop": refused."""
    if constraint is not None and params.stop:
        raise ParamError(field, f"stop strings cannot be combined with {constraint.get('field')} "
                                "(a stop string could cut the JSON short)")


def required_text(body: dict[str, Any], field: str) -> str:
    """A required non-empty string field, bounded like every text the daemon tokenizes."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ParamError(field, "required: a non-empty string")
    if len(value) > MAX_CONTENT_CHARS:
        raise ParamError(field, f"at most {MAX_CONTENT_CHARS} characters")
    utf8_size(value, field)
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
        utf8_size(value, field)
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
    msgs, size = messages_sized(body)
    _openai_common(body)
    only_default(body, "logprobs", (None, False), "log-probabilities are not returned")
    only_default(body, "top_logprobs", (None, 0), "log-probabilities are not returned")
    tools = tools_of(body)
    constraint, tool_answer = tool_constraint(body, tools)
    value = body.get("parallel_tool_calls")
    if value is not None and not isinstance(value, bool):
        raise ParamError("parallel_tool_calls", "must be true or false")  # either way: at most one call per answer
    fmt = response_format(body)
    if fmt is not None:
        if constraint is not None:
            raise ParamError("response_format", "cannot be combined with a tool_choice that forces a call")
        constraint, tool_answer = fmt, ""
    only_default(body, "store", (None, False), "completions are not stored")
    only_default(body, "modalities", (None, ["text"]), "text only")
    only_default(body, "service_tier", (None, "auto", "default"), "one service tier")
    only_default(body, "reasoning_effort", (None,), "not a reasoning model API")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ParamError("metadata", "must be an object")
    stream = boolean(body, "stream")
    params = sampling(body, max_tokens_fields=("max_completion_tokens", "max_tokens"))
    _no_stop_with(params, constraint, "stop")
    request = GenerationRequest(params=params, messages=msgs, deadline_s=deadline(body), constraint=constraint,
                                tools=tools)
    return ParsedRequest(model, request, stream, stream_options(body, stream), prompt_bytes=size,
                         tool_answer=tool_answer)


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
    return ParsedRequest(model, request, stream, stream_options(body, stream),
                         prompt_bytes=len(prompt.encode("utf-8")) if prompt is not None else 0)


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
    return ParsedRequest(model, GenerationRequest(params=params, prompt=text, deadline_s=limit), stream, id=request_id,
                         prompt_bytes=len(text.encode("utf-8")), param_prefix=prefix)


# --- Ollama --------------------------------------------------------------------------------

#: Ollama's ``options`` Lastmile implements (the rest are refused, naming them).
_OLLAMA_OPTIONS = frozenset({"num_predict", "temperature", "top_p", "top_k", "seed", "stop", "tool_choice"})
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
    mapped = {k: v for k, v in options.items() if k not in ("num_predict", "tool_choice")}
    num_predict = options.get("num_predict")
    if num_predict is not None and num_predict not in (-1, -2):  # -1/-2: "until the end": the server's default
        mapped["max_tokens"] = num_predict
    try:
        return sampling(mapped)
    except ParamError as exc:
        name = "num_predict" if exc.field == "max_tokens" else exc.field
        raise ParamError(f"options.{name}", exc.message.split(": ", 1)[1]) from None


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(body: dict[str, Any], field: str = "keep_alive") -> float | None:
    """Ollama's ``keep_alive``: a number of seconds or a Go duration (``"5m"``, ``"1h30m"``,
    ``"0"``); negative means "keep loaded". None when not given."""
    value = body.get(field)
    if value is None:
        return None
    if _is_number(value):
        return float(value)
    if isinstance(value, str) and 0 < len(value) <= 64:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = float(text)  # "300": seconds
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return sign * seconds
        total, number = 0.0, ""
        i = 0
        while i < len(text):
            c = text[i]
            if c.isascii() and (c.isdigit() or c == "."):
                number += c
                i += 1
                continue
            unit = next((u for u in ("ns", "us", "µs", "ms", "s", "m", "h") if text.startswith(u, i)), None)
            if unit is None or not number:
                break
            try:
                total += float(number) * _DURATION_UNITS[unit]
            except ValueError:
                break
            number, i = "", i + len(unit)
        else:
            if not number and text:
                return sign * total
    raise ParamError(field, f"must be a duration like \"5m\" or a number of seconds, got {value!r}")


def _ollama_common(body: dict[str, Any]) -> bool:
    only_default(body, "think", (None, False), "not a reasoning model API")
    keep_alive_seconds(body)
    return boolean(body, "stream", True)  # Ollama streams unless told not to


def parse_ollama_chat(body: dict[str, Any]) -> ParsedRequest:
    """``POST /api/chat``: ``messages`` through the chat template; NDJSON stream by default."""
    refuse_unknown(body, _OLLAMA_COMMON | {"messages", "tools"})
    model = ollama_model(body)
    tools = tools_of(body)
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    # Ollama has no tool_choice: the model decides ("auto"); Lastmile's extension
    # options.tool_choice ("required" or a tool's name) forces a constrained call
    choice = options.get("tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    try:
        constraint, tool_answer = tool_constraint({"tool_choice": choice}, tools)
    except ParamError as exc:
        raise ParamError("options." + exc.field, exc.message.split(": ", 1)[1]) from None
    fmt = ollama_format(body)
    if fmt is not None:
        if constraint is not None:
            raise ParamError("format", "cannot be combined with options.tool_choice forcing a call")
        constraint, tool_answer = fmt, ""
    value = body.get("messages")
    if isinstance(value, list):
        for i, m in enumerate(value):
            if isinstance(m, dict) and m.get("images"):
                raise ParamError(f"messages[{i}].images", "images are not supported (text models only)")
        value = [{k: v for k, v in m.items() if k != "images"} if isinstance(m, dict) else m for m in value]
    msgs, size = messages_sized({"messages": value})
    stream = _ollama_common(body)
    params = _ollama_options(body)
    _no_stop_with(params, constraint, "options.stop")
    return ParsedRequest(model, GenerationRequest(params=params, messages=msgs, constraint=constraint, tools=tools),
                         stream, prompt_bytes=size, param_prefix="options.", keep_alive=keep_alive_seconds(body),
                         tool_answer=tool_answer)


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
    size = len(prompt.encode("utf-8")) + (utf8_size(system, "system") if system else 0)
    raw = boolean(body, "raw")
    stream = _ollama_common(body)
    params = _ollama_options(body)
    constraint = ollama_format(body)
    _no_stop_with(params, constraint, "options.stop")
    if raw:
        if system:
            raise ParamError("system", "a raw prompt takes no system message (put it in the prompt)")
        request = GenerationRequest(params=params, prompt=prompt, constraint=constraint)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        request = GenerationRequest(params=params, messages=tuple(msgs), constraint=constraint)
    return ParsedRequest(model, request, stream, prompt_bytes=size, param_prefix="options.",
                         keep_alive=keep_alive_seconds(body))


@dataclass(frozen=True, slots=True)
class Preload:
    """Ollama's load/unload call: ``/api/generate`` with no prompt (``/api/chat`` with no
    messages); ``keep_alive: 0`` unloads."""

    model: str
    unload: bool
    chat: bool


def parse_ollama_preload(body: dict[str, Any], *, chat: bool) -> Preload | None:
    """A :class:`Preload` when the body is one (no prompt / no messages), else None (a
    generation: the route parses it with :func:`parse_ollama_generate` / ``_chat``)."""
    key = "messages" if chat else "prompt"
    if body.get(key) not in (None, "", []):
        return None
    allowed = _OLLAMA_COMMON | {key} | (set() if chat else {"system", "raw"})
    refuse_unknown(body, frozenset(allowed))
    model = ollama_model(body)
    _ollama_common(body)
    _ollama_options(body)
    keep = keep_alive_seconds(body)
    return Preload(model, unload=keep is not None and keep == 0, chat=chat)


# --- the daemon's cheap token bound ----------------------------------------------------------

#: Normalizers that only recompose or fold characters: one output byte stands for at most this
#: many input bytes (fullwidth "Ａ", 3 bytes, folds to "A"; a Hangul syllable, 3 bytes, composes
#: from 3 jamo, 9 bytes), so a token of L bytes covers at most 4 L bytes of the request.
_FOLDING_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend"})
_KEEPING_BEHAVIOURS = frozenset({"isolated", "merged_with_previous", "merged_with_next", "contiguous", "Isolated",
                                 "MergedWithPrevious", "MergedWithNext", "Contiguous"})


def _normalizer_factor(norm: Any) -> int | None:
    if norm is None:
        return 1
    if not isinstance(norm, dict):
        return None
    kind = norm.get("type")
    if kind == "Sequence":
        factor = 1
        for part in norm.get("normalizers") or []:
            f = _normalizer_factor(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind in _FOLDING_NORMALIZERS:
        return 1 if kind == "Prepend" else 4
    if kind == "Replace":  # SentencePiece-style " " -> "▁": one byte becomes three, never fewer
        pattern, content = norm.get("pattern") or {}, norm.get("content")
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        if isinstance(literal, str) and literal and isinstance(content, str) and content:
            return max(1, -(-len(literal.encode()) // len(content.encode())))
        return None
    return None  # Strip, StripAccents, BertNormalizer, Precompiled...: may drop text entirely


def _pre_tokenizer_keeps_text(pre: Any) -> bool:
    if pre is None:
        return True
    if not isinstance(pre, dict):
        return False
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_text(p) for p in pre.get("pretokenizers") or [])
    if kind in ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts"):
        return True
    if kind in ("Split", "Punctuation"):
        return pre.get("behavior") in _KEEPING_BEHAVIOURS
    return False  # Whitespace, BertPreTokenizer, WhitespaceSplit, CharDelimiterSplit drop characters


def _byte_level_alphabet() -> frozenset[str]:
    """GPT-2's byte-to-unicode table (what ``tokenizers``' ByteLevel uses): one character per byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    chars = []
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return frozenset(chars)


_BYTE_LEVEL = _byte_level_alphabet()


def _piece_bytes(piece: str, byte_level: bool) -> int:
    """Request bytes a vocabulary piece stands for: one per character of the byte-level
    alphabet, else (over-counting, which only loosens the bound) its UTF-8 length."""
    if byte_level and all(c in _BYTE_LEVEL for c in piece):
        return len(piece)
    return len(piece.encode("utf-8", "surrogatepass"))


def max_bytes_per_token(tokenizer: dict[str, Any]) -> int | None:
    """The most request bytes one token of this ``tokenizer.json`` can stand for, or None when
    no such bound holds (a normalizer or pre-tokenizer that drops text, unknown characters
    fused into one token). With it, a prompt of B bytes has at least ceil(B / bound) tokens:
    the daemon refuses a prompt that can never fit before the runner tokenizes it.

    Why it holds: a byte-level BPE token's string has one character per byte it covers (and
    its characters are counted as one byte each); a SentencePiece
    piece spells its bytes, "▁" (3 bytes) for a space (1), a byte-fallback token ``<0x41>``
    (6) for one byte. Every character of the request ends up in some token unless something
    drops it, which is what the checks above refuse to trust.
    """
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if not isinstance(model, dict):
        return None
    factor = _normalizer_factor(tokenizer.get("normalizer"))
    if factor is None or not _pre_tokenizer_keeps_text(tokenizer.get("pre_tokenizer")):
        return None
    kind, vocab = model.get("type"), model.get("vocab")
    byte_level = "ByteLevel" in str(tokenizer.get("pre_tokenizer"))
    if kind == "BPE":
        if model.get("fuse_unk") and not model.get("byte_fallback") and not byte_level:
            return None  # a run of unknown characters is one token
        pieces = list(vocab) if isinstance(vocab, dict) else None
    elif kind == "Unigram":
        if not model.get("byte_fallback"):
            return None  # unknown characters fuse into one <unk>
        pieces = [entry[0] for entry in vocab if isinstance(entry, list) and entry] if isinstance(vocab, list) else None
    else:
        return None  # WordPiece: a long word is one [UNK]
    if not pieces:
        return None
    added = [t.get("content") for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
    longest = max([_piece_bytes(p, byte_level) for p in pieces if isinstance(p, str)]
                  + [len(p.encode("utf-8", "surrogatepass")) for p in added if isinstance(p, str)])  # matched as typed
    return max(1, longest) * factor
