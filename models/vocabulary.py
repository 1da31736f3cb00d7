"""The words Lastmile's settings and tensors are written in: every per-model setting's name,
default, bounds or allowed values and whether a loaded model takes a change of it live or
only through a reload; and the KServe V2 datatypes with their NumPy names.

One table, read by the daemon (``models/settings.py`` builds its validators from it, the
manager its batcher keys), by the CLI (``lastmile load`` flags and their help, ``config
show``) and by the TUI's forms, so "which keys reload" or "what is the largest batch" has one
answer. It imports nothing but the standard library on purpose: the TUI and the CLI may read
it without pulling in NumPy, torch or the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

Number = Union[int, float]

BACKENDS = ("auto", "deepspeed", "onnxruntime")
DTYPES = ("fp32", "fp16", "bf16")  # a model's compute precision (not a tensor's V2 datatype)
GRAPH_FUSION_LEVELS = ("off", "basic", "extended", "all")
OFFLOAD_MODES = ("none", "cpu")
GENERATION_ENGINES = ("auto", "ort-genai", "deepspeed")  # auto: ort-genai on CPU (runtime/generation)
GENERATION_PRECISIONS = ("auto", "int4", "int8", "fp32")  # ort-genai weights; auto: measured (runtime/generation/quality.py)
DEVICE_KINDS = ("cuda", "npu", "xpu", "mps", "hpu")  # accelerators a device name may start with
DEVICE_WORDS = ("auto", "cpu")  # device names that carry no index


@dataclass(frozen=True)
class Setting:
    """One per-model setting.

    ``kind`` is ``"int"``, ``"float"``, ``"choice"`` or ``"device"``. ``live`` is True when a
    loaded model takes a change at once (the batcher's knobs); any other change reloads the
    model with the new value. ``optional`` means ``None`` is a value ("no limit").
    """

    name: str
    kind: str
    default: Any  # int, float, str or None by kind; Any so ModelSettings' typed fields can take it
    live: bool
    help: str
    low: Number | None = None
    high: Number | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False

    def allowed(self) -> str:
        """What a value may be, in the words error messages and ``--help`` use."""
        if self.kind == "choice":
            text = ", ".join(self.choices)
        elif self.kind == "device":
            text = ", ".join([*DEVICE_WORDS, *(f"{k}, {k}:N" for k in DEVICE_KINDS[:2]), *DEVICE_KINDS[2:]])
        elif self.kind == "int":
            text = f"an integer from {self.low} to {self.high}"
        else:
            text = f"a number from {float(self.low or 0.0)} to {float(self.high or 0.0)}"
        return text

    @property
    def python_type(self) -> type:
        """The type a command-line or form value is parsed into."""
        return {"int": int, "float": float}.get(self.kind, str)


SETTINGS: tuple[Setting, ...] = (
    Setting("backend", "choice", "auto", False, "runtime that executes the model", choices=BACKENDS),
    Setting("device", "device", "auto", False, "where it runs: auto, cpu or an accelerator"),
    Setting("dtype", "choice", "fp32", False, "compute precision", choices=DTYPES),
    Setting("graph_fusion", "choice", "basic", False, "graph optimisation level (settings files also take true = all, false = off)",
            choices=GRAPH_FUSION_LEVELS),
    Setting("memory_limit_mb", "int", None, False, "memory the model may use, in MB (unset: no limit)",
            low=16, high=16 * 1024 * 1024, optional=True),
    Setting("max_batch_size", "int", 8, True, "most rows batched into one model call", low=1, high=4096),
    Setting("max_delay_ms", "float", 2.0, True, "ceiling on a partial batch's wait for just-answered clients, in ms (a request finding a runner free never waits)", low=0.0, high=10_000.0),
    Setting("max_queue", "int", 256, True, "requests waiting beyond this get 503", low=1, high=1_000_000),
    Setting("instances", "int", 1, False, "runner processes serving the model", low=1, high=64),
    Setting("tp_size", "int", 1, False, "tensor-parallel ranks (DeepSpeed)", low=1, high=64),
    Setting("offload", "choice", "none", False, "ZeRO-Inference parameter offload", choices=OFFLOAD_MODES),
    Setting("threads", "int", 0, False, "intra-op threads (0: the backend picks, one per physical core)", low=0, high=1024),
    Setting("timeout_s", "float", 30.0, True, "per request, queueing included, in s", low=0.001, high=3600.0),
    Setting("load_timeout_s", "float", 600.0, False, "a load or restart taking longer is stopped, in s",
            low=1.0, high=86_400.0),
    # text generation (causal LMs; runtime/generation)
    Setting("engine", "choice", "auto", False,
            "generation engine (auto: the one backend names, else ort-genai on CPU)", choices=GENERATION_ENGINES),
    Setting("precision", "choice", "auto", False,
            "generation weights for ort-genai (auto: the cheapest whose answers stay close, measured at first load)",
            choices=GENERATION_PRECISIONS),
    Setting("max_num_seqs", "int", 0, False,
            "sequences generated at once (slots, each with its KV cache; 0: auto, from memory, at most 16)",
            low=0, high=1024),
    Setting("max_context", "int", 0, False, "tokens one sequence may hold, prompt + output (0: the model's, at most 2048)",
            low=0, high=1_048_576),
    Setting("keep_alive_s", "float", 0.0, True, "unload after this many idle seconds (0: never)", low=0.0, high=31_536_000.0),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
LIVE_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.live)
RELOAD_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if not s.live)


def needs_reload(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that a loaded model takes only by a reload, sorted; unknown
    names count as reloading (the daemon refuses them anyway)."""
    return sorted(k for k in keys if k not in LIVE_KEYS)


# KServe Open Inference Protocol V2 datatypes -> the NumPy dtype name that holds them. BF16 has
# no NumPy dtype: it travels as raw 2-byte words (uint16) and the backend widens it.
V2_DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "uint16",
}
RAW_V2_DATATYPES = ("BF16",)  # carried in another dtype's words: no NumPy type of their own
