"""Hugging Face folders as people have them: what a bare folder *is*, read from its JSON files.

A folder written by ``save_pretrained`` (``config.json``, ``*.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``...) or a sentence-transformers folder (plus ``modules.json``,
``1_Pooling/config.json``, a ``Normalize`` module, ``sentence_bert_config.json``) is described
here with no ``model.toml``: its task, how to pool and normalize, its labels, its max length,
its tokenizer, and which file each of those came from (``derived``), so ``lastmile models`` and
the API can say why the daemon believes what it believes.

Only JSON is read: the daemon lists the store with this and must not import torch or
transformers (seconds and ~300 MB). Whether transformers really knows the architecture is
checked where the model is loaded (the runner), and that error names it too.

Rules that protect the operator:

- weights come from ``*.safetensors``; ``pytorch_model.bin`` is a pickle (loading it runs its
  code) and is refused unless the manifest says ``trust_pickle = true``;
- ``trust_remote_code`` is never honoured: a folder whose architecture exists only as code in
  the folder (``auto_map``) is refused with the class named;
- an architecture whose name says no task Lastmile serves is refused naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from lastmile.models.errors import ManifestError
from lastmile.models.spec import TensorSpec

__all__ = [
    "TOKEN_INPUT_NAMES",
    "token_types",
    "HfFolder",
    "Pooling",
    "TokenizerInfo",
    "TASKS",
    "TEXT_TASKS",
    "POOLING_MODES",
    "describe_hf_folder",
    "has_hf_weights",
    "is_hf_candidate",
    "task_of_architecture",
    "wire_inputs",
    "wire_outputs",
    "api_inputs",
    "api_outputs",
]

# Tasks, named as transformers' pipelines name them (``generate`` is served by the generation
# engine, not by the tensor path here).
TASKS = ("feature-extraction", "text-classification", "token-classification", "generate")
TEXT_TASKS = ("feature-extraction", "text-classification", "token-classification")

# Architecture class-name suffix -> task. Longest suffix first (``ForTokenClassification``
# must win over a plain ``Model``).
_SUFFIX_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForCausalLM", "generate"),
    ("ForConditionalGeneration", "generate"),
    ("LMHeadModel", "generate"),
    ("Model", "feature-extraction"),
)

# sentence-transformers' pooling modes, in the order its Pooling module concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"

# A tokenizer_config's model_max_length when the tokenizer has none ("very large integer").
_NO_LIMIT = 10**12
# Byte budget per text row on the way to the runner: a text longer than this many bytes per
# allowed token is refused before tokenizing (or cut, when the request asks to truncate).
BYTES_PER_TOKEN = 16
MIN_TEXT_BYTES = 1024

OVERRIDE_KEYS = ("task", "max_length", "pooling", "normalize", "labels")


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector per text, exactly as sentence-transformers' Pooling
    module does it: each mode in ``modes`` (in :data:`POOLING_MODES` order) concatenated."""

    modes: tuple[str, ...]
    include_prompt: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"modes": list(self.modes), "include_prompt": self.include_prompt}


@dataclass(frozen=True)
class TokenizerInfo:
    """What the runner needs to tokenize like the folder's own tokenizer: ``tokenizer.json``
    (normalizer, pre-tokenizer, model, post-processor with the special tokens) plus the
    settings ``tokenizer_config.json`` keeps outside it."""

    file: str  # "tokenizer.json", relative to the folder
    padding_side: str = "right"
    pad_token: str | None = None
    pad_id: int | None = None
    model_max_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "padding_side": self.padding_side, "pad_token": self.pad_token,
                "pad_id": self.pad_id, "model_max_length": self.model_max_length}


@dataclass(frozen=True)
class HfFolder:
    """A Hugging Face folder, described from its JSON files (see the module docstring).

    ``derived`` maps each derived key to ``(value, source)``: the file it was read from (or
    ``model.toml [text]`` for an override, ``default`` when nothing said).
    """

    path: Path
    task: str
    architecture: str
    model_type: str
    max_length: int | None
    hidden_size: int | None = None
    vocab_size: int | None = None
    type_vocab_size: int | None = None
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    pooling: Pooling | None = None
    normalize: bool = False
    sentence_transformers: bool = False
    tokenizer: TokenizerInfo | None = None
    weights: tuple[str, ...] = ()
    weights_format: str = "safetensors"
    files: tuple[str, ...] = ()
    derived: dict[str, tuple[Any, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def takes_text(self) -> bool:
        """Served on the text path (a tokenizer and a task of :data:`TEXT_TASKS`)."""
        return self.task in TEXT_TASKS and self.tokenizer is not None

    @property
    def text_bytes(self) -> int:
        """Bytes of UTF-8 one text may have on its way to the runner (see :data:`BYTES_PER_TOKEN`)."""
        return max(MIN_TEXT_BYTES, (self.max_length or 512) * BYTES_PER_TOKEN)

    @property
    def embedding_dim(self) -> int | None:
        if self.hidden_size is None:
            return None
        return self.hidden_size * (len(self.pooling.modes) if self.pooling else 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON for ``/lm/v1/models`` and ``lastmile models``: what was derived, from which file."""
        return {
            "task": self.task,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "embedding_dim": self.embedding_dim if self.task == "feature-extraction" else None,
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "pooling": self.pooling.as_dict() if self.pooling else None,
            "normalize": self.normalize,
            "sentence_transformers": self.sentence_transformers,
            "tokenizer": self.tokenizer.as_dict() if self.tokenizer else None,
            "weights": list(self.weights),
            "weights_format": self.weights_format,
            "files": list(self.files),
            "derived": {k: {"value": v, "from": src} for k, (v, src) in self.derived.items()},
            "notes": list(self.notes),
        }


# --- small readers ------------------------------------------------------------------------------


def _read_json(folder: Path, rel: str, files: list[str], *, required: bool = False) -> dict[str, Any] | list | None:
    path = folder / rel
    if not path.is_file():
        if required:
            raise ManifestError(folder, rel, "missing; a Hugging Face folder needs config.json")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(path, "", f"not readable as JSON: {exc}") from exc
    files.append(rel)
    return value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _token_str(value: Any) -> str | None:
    """``pad_token`` is a string or, in older files, ``{"content": "[PAD]", ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def has_hf_weights(folder: Path) -> bool:
    """``*.safetensors`` or a pickled ``pytorch_model*.bin`` at the top of ``folder``."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def is_hf_candidate(folder: Path) -> bool:
    """A folder that looks like a Hugging Face model: ``config.json`` plus weights of either
    kind (a pickle is refused later, with the reason, rather than not recognised at all)."""
    return folder.is_dir() and (folder / "config.json").is_file() and has_hf_weights(folder)


def task_of_architecture(architecture: str) -> str | None:
    """The task an architecture's class name says (``BertForSequenceClassification`` ->
    ``text-classification``), or ``None`` when its suffix names no task served here."""
    for suffix, task in _SUFFIX_TASKS:
        if architecture.endswith(suffix) and len(architecture) > len(suffix):
            return task
    return None


# --- the description ----------------------------------------------------------------------------


def describe_hf_folder(path: Path | str, *, trust_pickle: bool = False,
                       overrides: Mapping[str, Any] | None = None, weights_file: str | None = None) -> HfFolder:
    """Describe the Hugging Face folder at ``path`` from its JSON files only.

    ``overrides`` is a manifest's ``[text]`` table (keys :data:`OVERRIDE_KEYS`); what it sets
    wins and is recorded as coming from ``model.toml [text]``. Raises :class:`ManifestError`
    naming the file and key for a folder that cannot be served: no weights, pickle weights
    without ``trust_pickle``, remote code, an architecture naming no task served here.
    """
    folder = Path(path)
    files: list[str] = []
    derived: dict[str, tuple[Any, str]] = {}
    notes: list[str] = []
    config = _read_json(folder, "config.json", files, required=True)
    if not isinstance(config, dict):
        raise ManifestError(folder / "config.json", "", "must hold a JSON object")

    if weights_file is not None:  # an export (model.onnx) next to the source folder's JSON files
        weights, weights_format = [weights_file], "onnx"
    else:
        weights, weights_format = _weights(folder, trust_pickle)
    files.extend(weights)

    forced = (overrides or {}).get("task")
    if forced and not config.get("architectures"):
        architecture, task = "", str(forced)  # checked against TASKS with the other overrides
    else:
        architecture, task = _architecture(folder, config)
    derived["task"] = (task, "config.json architectures")
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else ""
    hidden = _int(config.get("hidden_size")) or _int(config.get("d_model")) or _int(config.get("dim"))
    vocab = _int(config.get("vocab_size"))

    labels: tuple[str, ...] = ()
    multi_label = False
    if task in ("text-classification", "token-classification"):
        labels = _labels(folder, config)
        derived["labels"] = (list(labels), "config.json id2label" if "id2label" in config else "config.json num_labels")
        multi_label = config.get("problem_type") == "multi_label_classification"
        if multi_label:
            derived["multi_label"] = (True, "config.json problem_type")

    tokenizer = _tokenizer(folder, config, files, derived)
    if tokenizer is None and task in TEXT_TASKS:
        notes.append("no tokenizer.json: send token ids (input_ids) instead of text, or add the "
                     "tokenizer files the model was trained with")

    st = _sentence_transformers(folder, files, derived, notes)
    pooling, normalize, st_max = st if st is not None else (None, False, None)
    if task == "feature-extraction" and pooling is None:
        pooling = Pooling(("mean",))
        derived["pooling"] = (["mean"], "default (no 1_Pooling/config.json): mean over the attention mask")
    if task == "feature-extraction":
        derived.setdefault("normalize", (normalize, "default (no Normalize module in modules.json)"))

    max_length = _max_length(config, model_type, tokenizer, st_max, derived)

    described = HfFolder(
        path=folder, task=task, architecture=architecture, model_type=model_type, max_length=max_length,
        hidden_size=hidden, vocab_size=vocab, type_vocab_size=_int(config.get("type_vocab_size")),
        labels=labels, multi_label=multi_label, pooling=pooling if task == "feature-extraction" else None,
        normalize=normalize if task == "feature-extraction" else False, sentence_transformers=st is not None,
        tokenizer=tokenizer, weights=tuple(weights), weights_format=weights_format,
        files=tuple(dict.fromkeys(files)), derived=derived, notes=tuple(notes),
    )
    if overrides:
        described = _apply_overrides(described, overrides)
    return described


def _weights(folder: Path, trust_pickle: bool) -> tuple[list[str], str]:
    safetensors = sorted(p.name for p in folder.glob("*.safetensors"))
    if safetensors:
        return safetensors, "safetensors"
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if not pickles:
        raise ManifestError(folder, "weights", "no *.safetensors (and no pytorch_model.bin) next to config.json")
    if not trust_pickle:
        raise ManifestError(
            folder, "trust_pickle",
            f"{pickles[0]} is a pickle: loading it runs whatever code it holds; refused unless model.toml "
            "sets trust_pickle = true. Better: convert it to safetensors (save_pretrained(..., "
            "safe_serialization=True)) on a machine you trust",
        )
    return pickles, "pickle"


def _architecture(folder: Path, config: Mapping[str, Any]) -> tuple[str, str]:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ManifestError(
            folder / "config.json", "architectures",
            f"got {archs!r}; need the model class name (e.g. [\"BertModel\"]) to know the task; add it to "
            "config.json, or set task in model.toml [text]",
        )
    architecture = archs[0]
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and any(architecture in str(v) for v in auto_map.values()):
        raise ManifestError(
            folder / "config.json", "auto_map",
            f"architecture {architecture!r} is code shipped inside the folder (auto_map); Lastmile never "
            "runs a model folder's own code (trust_remote_code is not honoured). Use a model whose "
            "architecture is part of transformers",
        )
    task = task_of_architecture(architecture)
    if task is None:
        raise ManifestError(
            folder / "config.json", "architectures",
            f"architecture {architecture!r} names no task Lastmile serves; served: *Model (embeddings), "
            "*ForSequenceClassification, *ForTokenClassification, *ForCausalLM (generation)",
        )
    return architecture, task


def _labels(folder: Path, config: Mapping[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            pairs = sorted((int(k), str(v)) for k, v in id2label.items())
        except (TypeError, ValueError):
            raise ManifestError(folder / "config.json", "id2label", f"keys must be integers, got {list(id2label)[:5]}") from None
        if [i for i, _ in pairs] != list(range(len(pairs))):
            raise ManifestError(folder / "config.json", "id2label", f"keys must be 0..{len(pairs) - 1}, got {[i for i, _ in pairs]}")
        return tuple(label for _, label in pairs)
    n = _int(config.get("num_labels")) or 2
    return tuple(f"LABEL_{i}" for i in range(n))


def _tokenizer(folder: Path, config: Mapping[str, Any], files: list[str],
               derived: dict[str, tuple[Any, str]]) -> TokenizerInfo | None:
    if not (folder / "tokenizer.json").is_file():
        return None
    files.append("tokenizer.json")
    tok_config = _read_json(folder, "tokenizer_config.json", files) or {}
    special = _read_json(folder, "special_tokens_map.json", files) or {}
    if not isinstance(tok_config, dict):
        raise ManifestError(folder / "tokenizer_config.json", "", "must hold a JSON object")
    side = tok_config.get("padding_side", "right")
    if side not in ("left", "right"):
        raise ManifestError(folder / "tokenizer_config.json", "padding_side", f"got {side!r}; allowed: left, right")
    derived["padding_side"] = (side, "tokenizer_config.json" if "padding_side" in tok_config else "default")
    pad = _token_str(tok_config.get("pad_token"))
    source = "tokenizer_config.json pad_token"
    if pad is None and isinstance(special, dict):
        pad, source = _token_str(special.get("pad_token")), "special_tokens_map.json pad_token"
    pad_id = _pad_id(folder, pad)
    if pad_id is None and _int(config.get("pad_token_id")) is not None:
        pad_id, source = config["pad_token_id"], "config.json pad_token_id"
    if pad_id is None:
        pad_id, source = 0, "default (no pad token named anywhere): id 0, masked out by attention_mask"
    derived["pad_token"] = ({"token": pad, "id": pad_id}, source)
    limit = _int(tok_config.get("model_max_length"))
    return TokenizerInfo("tokenizer.json", side, pad, pad_id, limit if limit and limit < _NO_LIMIT else None)


def _pad_id(folder: Path, pad: str | None) -> int | None:
    """The id of ``pad`` in tokenizer.json's vocabulary or added tokens (JSON only)."""
    if pad is None:
        return None
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(folder / "tokenizer.json", "", f"not readable as JSON: {exc}") from exc
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == pad and _int(added.get("id")) is not None:
            return added["id"]
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and _int(vocab.get(pad)) is not None:
        return vocab[pad]
    return None


def _sentence_transformers(folder: Path, files: list[str], derived: dict[str, tuple[Any, str]],
                           notes: list[str]) -> tuple[Pooling | None, bool, int | None] | None:
    """``(pooling, normalize, max_seq_length)`` from a sentence-transformers folder, or None."""
    modules = _read_json(folder, "modules.json", files)
    if modules is None:
        return None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ManifestError(folder / "modules.json", "", "must be a list of module objects")
    pooling: Pooling | None = None
    normalize = False
    for i, module in enumerate(modules):
        kind, rel = module.get("type"), module.get("path", "")
        if kind == _ST_TRANSFORMER:
            if rel not in ("", "."):
                raise ManifestError(folder / "modules.json", f"[{i}].path",
                                    f"the Transformer module lives in {rel!r}; Lastmile serves it from the folder itself")
        elif kind == _ST_POOLING:
            pooling = _st_pooling(folder, str(rel), files)
            derived["pooling"] = (list(pooling.modes), f"{rel}/config.json")
        elif kind == _ST_NORMALIZE:
            normalize = True
            derived["normalize"] = (True, f"modules.json [{i}] (Normalize)")
        else:
            raise ManifestError(folder / "modules.json", f"[{i}].type",
                                f"sentence-transformers module {kind!r} is not served here; served: Transformer, Pooling, Normalize")
    st_config = _read_json(folder, "sentence_bert_config.json", files)
    max_seq = _int(st_config.get("max_seq_length")) if isinstance(st_config, dict) else None
    if pooling is None:
        notes.append("modules.json has no Pooling module: embeddings are mean-pooled")
    return pooling, normalize, max_seq


def _st_pooling(folder: Path, rel: str, files: list[str]) -> Pooling:
    config = _read_json(folder, f"{rel}/config.json", files, required=False)
    if not isinstance(config, dict):
        raise ManifestError(folder / rel, "config.json", "the Pooling module has no readable config.json")
    modes = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key))
    if not modes:
        raise ManifestError(folder / rel / "config.json", "pooling_mode_*", "no pooling mode is switched on")
    order = tuple(m for m in POOLING_MODES if m in modes)
    return Pooling(order, bool(config.get("include_prompt", True)))


def _max_length(config: Mapping[str, Any], model_type: str, tokenizer: TokenizerInfo | None, st_max: int | None,
                derived: dict[str, tuple[Any, str]]) -> int | None:
    positions = _int(config.get("max_position_embeddings"))
    if positions is not None and model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        positions -= 2  # their position ids start after padding_idx + 1
    candidates = []
    if st_max:
        candidates.append((st_max, "sentence_bert_config.json max_seq_length"))
    elif tokenizer is not None and tokenizer.model_max_length:
        candidates.append((tokenizer.model_max_length, "tokenizer_config.json model_max_length"))
    if positions:
        candidates.append((positions, "config.json max_position_embeddings"))
    if not candidates:
        return None
    value, source = min(candidates, key=lambda c: c[0])
    derived["max_length"] = (value, source)
    return value


def _apply_overrides(desc: HfFolder, table: Mapping[str, Any]) -> HfFolder:
    """``model.toml [text]`` wins over what the folder says (checked key by key)."""
    file = desc.path / "model.toml"
    src = "model.toml [text]"
    derived = dict(desc.derived)
    changes: dict[str, Any] = {}
    for key, value in table.items():
        where = f"text.{key}"
        if key not in OVERRIDE_KEYS:
            raise ManifestError(file, where, f"unknown key; known: {', '.join(OVERRIDE_KEYS)}")
        if key == "task":
            if value not in TASKS:
                raise ManifestError(file, where, f"got {value!r}; allowed: {', '.join(TASKS)}")
            changes["task"] = value
        elif key == "max_length":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ManifestError(file, where, f"got {value!r}; must be an integer >= 1")
            changes["max_length"] = value
        elif key == "pooling":
            modes = [value] if isinstance(value, str) else value
            if not isinstance(modes, list) or not modes or any(m not in POOLING_MODES for m in modes):
                raise ManifestError(file, where, f"got {value!r}; allowed: one or a list of {', '.join(POOLING_MODES)}")
            changes["pooling"] = Pooling(tuple(m for m in POOLING_MODES if m in modes))
            value = list(changes["pooling"].modes)
        elif key == "normalize":
            if not isinstance(value, bool):
                raise ManifestError(file, where, f"got {value!r}; allowed: true, false")
            changes["normalize"] = value
        elif key == "labels":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ManifestError(file, where, f"got {value!r}; must be a non-empty list of strings")
            changes["labels"] = tuple(value)
        derived[key] = (value, src)
    task = changes.get("task", desc.task)
    if task == "feature-extraction" and changes.get("pooling", desc.pooling) is None:
        changes["pooling"] = Pooling(("mean",))
        derived.setdefault("pooling", (["mean"], "default"))
    if task in ("text-classification", "token-classification") and not changes.get("labels", desc.labels):
        raise ManifestError(file, "text.labels", f"task {task} needs labels (config.json has no id2label)")
    return replace(desc, derived=derived, **changes)


# --- the tensors ------------------------------------------------------------------------------
#
# Two views of one text model. The *API* view is what V2 metadata shows and callers send
# (``text`` BYTES, or token ids). The *wire* view is what crosses from the daemon's batcher to
# the runner: numeric only (the shared-memory batch buffers carry numeric arrays), one fixed
# width per text so every text request batches with every other.


def wire_inputs(desc: HfFolder) -> tuple[TensorSpec, ...]:
    """``text_utf8`` UINT8 ``[-1, text_bytes]`` (zero padded) and ``text_len`` INT32 ``[-1]``."""
    return (TensorSpec("text_utf8", "UINT8", (-1, desc.text_bytes)), TensorSpec("text_len", "INT32", (-1,)))


def wire_outputs(desc: HfFolder) -> tuple[TensorSpec, ...]:
    """What the runner returns for each text row (``token_count`` is before any truncation)."""
    count = TensorSpec("token_count", "INT32", (-1,))
    if desc.task == "feature-extraction":
        return (TensorSpec("embeddings", "FP32", (-1, desc.embedding_dim or -1)), count)
    n = len(desc.labels) or -1
    if desc.task == "text-classification":
        return (TensorSpec("logits", "FP32", (-1, n)), TensorSpec("scores", "FP32", (-1, n)), count)
    if desc.task == "token-classification":
        return (TensorSpec("logits", "FP32", (-1, -1, n)), TensorSpec("scores", "FP32", (-1, -1, n)), count)
    return ()


#: Architectures whose forward takes ``token_type_ids`` (segment ids; a Hugging Face tokenizer
#: returns them for these): BERT and the models built on its embeddings. RoBERTa, XLM-R,
#: CamemBERT, MPNet and DistilBERT take no segment ids (their tokenizers return none), so
#: they are not listed; DeBERTa takes them only when its config has token types.
TOKEN_TYPE_MODELS = frozenset({"bert", "albert", "electra", "ernie", "megatron-bert", "mobilebert", "convbert", "roformer",
                               "nezha", "squeezebert", "funnel", "layoutlm", "xlnet", "big_bird", "canine", "splinter",
                               "qdqbert", "rembert", "nystromformer", "yoso", "realm", "tapas"})
TOKEN_TYPE_IF_CONFIGURED = frozenset({"deberta", "deberta-v2"})


def token_types(desc: HfFolder) -> int:
    """How many segment ids (``token_type_ids`` values) the architecture takes; 0: it takes
    no ``token_type_ids`` input at all."""
    model_type = (desc.model_type or "").lower()
    if model_type in TOKEN_TYPE_MODELS:
        return desc.type_vocab_size or 2
    if model_type in TOKEN_TYPE_IF_CONFIGURED and desc.type_vocab_size:
        return desc.type_vocab_size
    return 0


#: The token-tensor names a text model's runner may be given (text_utf8/text_len otherwise).
TOKEN_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def token_id_inputs(desc: HfFolder) -> tuple[TensorSpec, ...]:
    """``input_ids`` (below the vocabulary size, when config.json gives it), ``attention_mask``
    and, for an architecture that takes them (:func:`token_types`), ``token_type_ids`` (below
    its number of token types): what a Hugging Face tokenizer returns for the model."""
    vocab = (0, desc.vocab_size) if desc.vocab_size else None
    specs = (TensorSpec("input_ids", "INT64", (-1, -1), vocab), TensorSpec("attention_mask", "INT64", (-1, -1), (0, 2)))
    types = token_types(desc)
    if types:
        specs += (TensorSpec("token_type_ids", "INT64", (-1, -1), (0, types)),)
    return specs


def api_inputs(desc: HfFolder) -> tuple[TensorSpec, ...]:
    """V2 inputs callers send: ``text`` BYTES ``[-1]``, or token ids instead of text."""
    ids = token_id_inputs(desc)
    if desc.tokenizer is None:
        return ids
    return (TensorSpec("text", "BYTES", (-1,)),) + ids


def api_outputs(desc: HfFolder) -> tuple[TensorSpec, ...]:
    """V2 outputs callers get; ``last_hidden_state`` only when asked for by name."""
    count = TensorSpec("token_count", "INT32", (-1,))
    hidden = TensorSpec("last_hidden_state", "FP32", (-1, -1, desc.hidden_size or -1))
    n = len(desc.labels) or -1
    if desc.task == "feature-extraction":
        return (TensorSpec("embeddings", "FP32", (-1, desc.embedding_dim or -1)), count, hidden)
    if desc.task == "text-classification":
        return (TensorSpec("label", "BYTES", (-1,)), TensorSpec("scores", "FP32", (-1, n)),
                TensorSpec("logits", "FP32", (-1, n)), count)
    if desc.task == "token-classification":
        return (TensorSpec("label", "BYTES", (-1, -1)), TensorSpec("scores", "FP32", (-1, -1, n)),
                TensorSpec("logits", "FP32", (-1, -1, n)), count)
    return ()


def softmax(values: Any, axis: int = -1) -> Any:
    """Numerically stable softmax (NumPy), the scores of a single-label classifier."""
    import numpy as np

    shifted = values - values.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(values: Any) -> Any:
    import numpy as np

    return 1.0 / (1.0 + np.exp(-values))



def _has_architectures(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # let describe_hf_folder report the file's problem
    return not isinstance(config, dict) or "architectures" in config


def manifest_parts(folder: Path, *, trust_pickle: bool = False, overrides: Mapping[str, Any] | None = None
                   ) -> tuple[HfFolder | None, tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[str, ...]]:
    """What a manifest holds for a Hugging Face folder: its description, the wire inputs and
    outputs the runner takes and returns, and notes for what is still missing. A folder whose
    config.json names no architecture (and no ``[text] task``) gets no description, only a note."""
    folder = Path(folder)
    if not (overrides or {}).get("task") and not _has_architectures(folder):
        # Not an error: the folder is listed, and the operator is told what to add.
        return None, (), (), (  # type: ignore[return-value]
            "inputs/outputs unknown: config.json names no architectures, so the task is unknown; set "
            "task in model.toml [text], or add [[inputs]] and [[outputs]] to model.toml",
        )
    desc = describe_hf_folder(folder, trust_pickle=trust_pickle, overrides=overrides)
    if desc.task == "generate":
        return desc, (), (), (
            f"{desc.architecture} is a causal language model: it is served by the generation engine "
            "(/v1/chat/completions, /v1/completions, V2 generate), not by V2 infer",
        )
    if desc.tokenizer is None:
        return desc, token_id_inputs(desc), wire_outputs(desc), desc.notes
    return desc, wire_inputs(desc), wire_outputs(desc), desc.notes


def onnx_text_parts(folder: Path, artifact: Path, overrides: Mapping[str, Any] | None = None
                    ) -> tuple[HfFolder, tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[str, ...]] | None:
    """An ONNX model folder that also carries a Hugging Face ``config.json`` and
    ``tokenizer.json`` (an export, e.g. ``lastmile models import NAME --to onnx``) takes text
    like its source: its description and wire tensors, or ``None`` when it is not a text model
    (then it is served as the plain ONNX graph it is)."""
    if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
        return None
    try:
        desc = describe_hf_folder(folder, overrides=overrides, weights_file=artifact.name)
    except ManifestError:
        if overrides:
            raise  # the operator's [text] table is wrong: say so
        return None
    if desc.task not in TEXT_TASKS:
        return None
    return desc, wire_inputs(desc), wire_outputs(desc), desc.notes
