"""Form parsing for the load, tune and playground screens, free of Textual so it is tested
directly.

Only cheap checks happen here (a number where a number belongs, an integer range the operator
can fix at once); everything else is the daemon's to judge, and its error message is what the
operator sees. Names, bounds, choices and which keys reload come from
:mod:`lastmile.models.vocabulary`, the one module of ``models`` the TUI may import (it is
standard library only), so the forms and the daemon cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lastmile.appliance.client.inputs import InputDataError, random_inputs as generate_inputs
from lastmile.appliance.client.tensors import InputTypeError, conform
from lastmile.appliance.client.units import fmt_mib
from lastmile.models import vocabulary
from lastmile.models.vocabulary import BY_NAME
from lastmile.tui.wording import option_text, part_name

BACKENDS = vocabulary.BACKENDS
DTYPES = vocabulary.DTYPES
GRAPH_FUSION = vocabulary.GRAPH_FUSION_LEVELS
PHASES = ("queued", "spawning", "loading", "warming", "ready")  # what a load reports, in order
RELOADING_KEYS = vocabulary.RELOAD_KEYS  # tuning these reloads the model (the confirm dialog asks first)



LOAD_FORM_NUMBERS = ("memory_limit_mb", "max_batch_size", "max_delay_ms", "max_queue")  # the load form's number fields
TUNE_FIELDS = ("max_batch_size", "max_delay_ms", "graph_fusion", "memory_limit_mb")  # the tune form's fields


def _spoken(keys: list[str]) -> str:
    """``["max_batch_size", "max_delay_ms"]`` -> ``"max batch size and max delay"``."""
    words = [key.removesuffix("_mb").removesuffix("_ms").replace("_", " ") for key in keys]
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def reload_note(keys: tuple[str, ...] = TUNE_FIELDS) -> str:
    """One sentence saying which of ``keys`` apply at once and which reload the model."""
    live = [k for k in keys if k in vocabulary.LIVE_KEYS]
    reloading = [k for k in keys if k not in vocabulary.LIVE_KEYS]
    parts = ([f"{_spoken(live)} apply at once"] if live else []) + ([f"{_spoken(reloading)} reload the model"] if reloading else [])
    return "; ".join(parts) + "."


class FormError(ValueError):
    """One field is wrong; ``field`` names it (the widget id), the message says how."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def parse_int(field: str, text: str, low: int, high: int) -> int | None:
    """A whole number within ``low..high``, or None for an empty field."""
    return _parse_number(field, text, low, high, int, "a whole number")


def _parse_number(field: str, text: str, low: float, high: float, kind: type, what: str = "a number") -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise FormError(field, f"{text!r} is not {what}") from None
    if not low <= value <= high:
        raise FormError(field, f"{value} is out of range ({low} to {high})")
    return value


def parse_setting(key: str, text: str) -> int | float | None:
    """A numeric setting's field, checked against the vocabulary's bounds (None when empty)."""
    setting = BY_NAME[key]
    low, high = setting.low or 0, setting.high or 0
    if setting.kind == "int":
        return parse_int(key, text, int(low), int(high))
    return _parse_number(key, text, float(low), float(high), float)


def load_parameters(fields: Mapping[str, str]) -> dict[str, Any]:
    """The load form's text values -> the ``parameters`` of a load request.

    Empty fields and ``auto``/``default`` choices are left out, so the manifest's settings and
    the daemon's defaults apply.
    """
    params: dict[str, Any] = {}
    for key in ("backend", "device", "dtype", "graph_fusion"):
        value = (fields.get(key) or "").strip()
        if value and value != "default" and not (key == "backend" and value == "auto"):
            params[key] = value
    numbers = {key: parse_setting(key, fields.get(key, "")) for key in LOAD_FORM_NUMBERS}
    params.update({k: v for k, v in numbers.items() if v is not None})
    return params


def tune_changes(current: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """The tune form -> only the settings that differ from ``current`` (the model's settings).

    An empty memory limit means "no limit" (``None``), which is a change only when a limit is
    set now. Empty batching fields mean "leave as is".
    """
    changes: dict[str, Any] = {}
    for key in ("max_batch_size", "max_delay_ms"):
        value = parse_setting(key, fields.get(key, ""))
        if value is not None and value != current.get(key):
            changes[key] = value
    fusion = (fields.get("graph_fusion") or "").strip()
    if fusion and fusion != current.get("graph_fusion"):
        if fusion not in GRAPH_FUSION:
            raise FormError("graph_fusion", f"{fusion!r}; allowed: {', '.join(GRAPH_FUSION)}")
        changes["graph_fusion"] = fusion
    limit = parse_setting("memory_limit_mb", fields.get("memory_limit_mb", ""))
    if limit != current.get("memory_limit_mb"):
        changes["memory_limit_mb"] = limit
    return changes


def phase_progress(phase: str | None) -> int:
    """How many of the load's steps are done (0..len(PHASES)-1) for a progress bar."""
    try:
        return PHASES.index(phase or "queued")
    except ValueError:
        return 1  # an unknown phase is past "queued" at least


# --- playground --------------------------------------------------------------------------------


def random_inputs(spec: list[dict[str, Any]], rows: int = 1, seq: int = 8, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Random arrays that fit a model's input spec (the client's one generator, see
    :mod:`lastmile.appliance.client.inputs`); its refusal as a form error."""
    try:
        return generate_inputs(spec, rows=rows, seq=seq, seed=seed)
    except InputDataError as exc:
        raise FormError("inputs", str(exc)) from None


def file_inputs(spec: list[dict[str, Any]], text: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``path.npy`` (a model with one input) or ``name=path.npy,name=path.npy``."""
    text = text.strip()
    if not text:
        raise FormError("files", "give a .npy path (or name=path,... for several inputs)")
    by_name = {t["name"]: t for t in spec}
    pairs: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if "=" in part:
            name, _, path = part.partition("=")
            pairs.append((name.strip(), path.strip()))
        elif len(spec) == 1:
            pairs.append((spec[0]["name"], part))
        else:
            raise FormError("files", f"the model has {len(spec)} inputs: write name=path for each ({', '.join(by_name)})")
    arrays, types = {}, {}
    for name, path in pairs:
        if name not in by_name:
            raise FormError("files", f"the model has no input {name!r} (inputs: {', '.join(by_name)})")
        try:
            array = np.load(Path(path).expanduser(), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FormError("files", f"{path}: {exc}") from None
        datatype = by_name[name]["datatype"]
        try:
            array, _ = conform(name, array, datatype)  # only conversions that change no value
        except InputTypeError as exc:
            raise FormError("files", str(exc).replace(f" and pass that file as --input {name}=FILE", "")) from None
        arrays[name], types[name] = array, datatype
    missing = set(by_name) - set(arrays)
    if missing:
        raise FormError("files", f"no file for input(s) {', '.join(sorted(missing))}")
    return arrays, types


def summarize_output(name: str, array: np.ndarray) -> str:
    """One or two lines per output tensor: shape, dtype, a few values, argmax for scores."""
    flat = array.reshape(-1)
    head = np.array2string(flat[:8], precision=4, separator=", ", suppress_small=True)
    line = f"{name}: {array.dtype} {list(array.shape)}  first values {head}{' ...' if flat.size > 8 else ''}"
    if array.ndim >= 2 and array.dtype.kind == "f" and array.shape[-1] > 1:
        top = array.reshape(-1, array.shape[-1]).argmax(axis=-1)[:8]
        line += f"\n    argmax over the last axis: {top.tolist()}{' ...' if top.size < array.size // array.shape[-1] else ''}"
    return line


_mib = fmt_mib


def describe_estimate(data: dict[str, Any]) -> str:
    """The daemon's dry-run answer as the load form shows it (its numbers, nothing made up)."""
    est = data.get("estimate") or {}
    parts = ", ".join(f"{part_name(k)} {_mib(v)}" for k, v in (est.get("parts") or {}).items() if v)
    free = ", ".join(f"{d} {_mib(v)} free" for d, v in (data.get("free_bytes") or {}).items())
    text = f"estimate: {_mib(est.get('total_bytes'))} on {est.get('device', '?')} ({parts or 'no breakdown'}); "
    if data.get("fits"):
        return text + f"fits: yes ({free or 'no free figure'})"
    short = data.get("shortfall") or {}
    reason = str(short.get("reason", "?")).replace("_", " ")
    text += (f"fits: NO ({reason} on {short.get('device', '?')}: needs {_mib(short.get('needed_bytes'))}, "
             f"{_mib(short.get('free_bytes'))} free, limit {_mib(short.get('limit_bytes'))})")
    options = data.get("options") or []
    if options:
        model = str(data.get("model") or "MODEL")
        text += "; would fit: " + "; ".join(option_text(model, o) for o in options[:4])
    return text
