"""Text in, embeddings or labels out: a Hugging Face text model inside a runner process.

The daemon sends each text as UTF-8 bytes in a fixed-width ``UINT8`` row plus its length
(``text_utf8`` / ``text_len``, see :func:`lastmile.models.hf.wire_inputs`): numeric tensors, so
they ride the shared-memory batch buffers and the batcher like any other, and every text
request batches with every other (one fixed width, no per-length groups). Why not BYTES through
``runtime/shm.py``: variable-length objects would need a second layout scheme in the runner
room's packing code for one caller; a fixed byte row costs a few KB of copying per text, which
is nothing next to the model.

Here, batched: decode the rows, tokenize them all at once with the folder's ``tokenizer.json``
(the ``tokenizers`` library, Rust, releasing the GIL; padding side, pad token and max length
from ``tokenizer_config.json``), run the model through the inner backend (DeepSpeed on the
folder's safetensors, or ONNX Runtime on an export of it), then pool and normalize exactly as
sentence-transformers does (:func:`pool`), or turn logits into scores.

Texts longer than the max length are truncated here and ``token_count`` reports the length
*before* truncation; the daemon refuses the request with that count unless the request asked
to truncate. Callers that tokenize themselves send ``input_ids`` + ``attention_mask`` instead.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lastmile.models.hf import HfFolder, sigmoid, softmax
from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest, TensorSpec
from lastmile.runtime.backends.base import Backend, BackendError

__all__ = ["TextBackend", "pool", "normalize", "is_text_manifest"]

HIDDEN_FLAG = "output_hidden"  # a wire input whose presence asks for last_hidden_state


def is_text_manifest(manifest: Manifest) -> bool:
    """Whether ``manifest`` is served on the text path: a Hugging Face description of a text
    task whose tensors are the derived ones (an operator who wrote [[inputs]] by hand gets the
    plain tensor path)."""
    from lastmile.models.hf import TEXT_TASKS

    hf = getattr(manifest, "hf", None)
    if hf is None or hf.task not in TEXT_TASKS:
        return False
    from lastmile.models.hf import TOKEN_INPUT_NAMES

    names = {s.name for s in manifest.inputs}
    return names == {"text_utf8", "text_len"} or {"input_ids", "attention_mask"} <= names <= set(TOKEN_INPUT_NAMES)


def pool(hidden: np.ndarray, mask: np.ndarray, modes: tuple[str, ...]) -> np.ndarray:
    """sentence-transformers' ``Pooling.forward`` in NumPy: each mode of ``modes`` (in its
    order: cls, max, mean, mean_sqrt_len, weightedmean, lasttoken) over ``hidden`` [n, T, H]
    with ``mask`` [n, T], concatenated along the last axis. float32 throughout, like torch."""
    hidden = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1))
        elif mode in ("mean", "mean_sqrt_len"):
            summed = (hidden * m).sum(axis=1)
            count = np.maximum(m.sum(axis=1), np.float32(1e-9))
            parts.append(summed / (count if mode == "mean" else np.sqrt(count)))
        elif mode == "weightedmean":
            weights = np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None] * m
            parts.append((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), np.float32(1e-9)))
        elif mode == "lasttoken":
            positions = np.arange(mask.shape[1])[None, :]
            last = np.where(mask > 0, positions, -1).max(axis=1)
            parts.append(hidden[np.arange(hidden.shape[0]), np.maximum(last, 0)])
        else:
            raise BackendError(f"pooling mode {mode!r} unknown")
    return np.concatenate(parts, axis=-1).astype(np.float32, copy=False)


def normalize(x: np.ndarray) -> np.ndarray:
    """``torch.nn.functional.normalize(x, p=2, dim=1)``: x / max(||x||, 1e-12)."""
    norm = np.sqrt((x.astype(np.float32) ** 2).sum(axis=-1, keepdims=True))
    return (x / np.maximum(norm, np.float32(1e-12))).astype(np.float32)


def _model_manifest(manifest: Manifest, hf: HfFolder) -> Manifest:
    """The inner backend's view: token tensors in, the model's own outputs out."""
    from lastmile.models.hf import token_types

    ids = (TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1)))
    if token_types(hf):  # BERT & co: segment ids go to the model (zeros when the caller sent text or none)
        ids += (TensorSpec("token_type_ids", "INT64", (-1, -1)),)
    if hf.task == "feature-extraction":
        outputs = (TensorSpec("last_hidden_state", "FP32", (-1, -1, hf.hidden_size or -1)),)
    elif hf.task == "text-classification":
        outputs = (TensorSpec("logits", "FP32", (-1, len(hf.labels))),)
    else:
        outputs = (TensorSpec("logits", "FP32", (-1, -1, len(hf.labels))),)
    if manifest.format == "onnx":
        return replace(manifest, inputs=(), outputs=())  # the graph says; outputs matched by name below
    return replace(manifest, inputs=ids, outputs=outputs)


def _deepspeed_class() -> type:
    from lastmile.runtime.backends.deepspeed_backend import DeepSpeedBackend

    class HfDeepSpeedBackend(DeepSpeedBackend):
        """DeepSpeed on a Hugging Face folder, loaded strictly: the architecture must be a
        transformers class (named in the error when it is not), safetensors unless the
        manifest trusts pickles, local files only, never remote code."""

        def _load_hf(self, folder: Path) -> Any:
            import transformers

            hf: HfFolder = self.manifest.hf
            arch = hf.architecture
            cls = getattr(transformers, arch, None) if arch else None
            if arch and cls is None:
                raise BackendError(
                    f"model {self.manifest.name!r}: architecture {arch!r} (config.json) is not known to "
                    f"transformers {transformers.__version__}; upgrade transformers or use a model whose "
                    "architecture it knows (remote code is never run)"
                )
            if cls is None:
                cls = {"feature-extraction": transformers.AutoModel,
                       "text-classification": transformers.AutoModelForSequenceClassification,
                       "token-classification": transformers.AutoModelForTokenClassification}[hf.task]
            model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                        use_safetensors=hf.weights_format == "safetensors")
            return model.eval()

    return HfDeepSpeedBackend


class TextBackend(Backend):
    """Tokenize, run, pool: see the module docstring."""

    def __init__(self, manifest: Manifest, settings: ModelSettings, backend_name: str) -> None:
        super().__init__(manifest, settings)
        hf: HfFolder = manifest.hf
        self.hf = hf
        self.name = backend_name
        inner_manifest = _model_manifest(manifest, hf)
        if backend_name == "deepspeed":
            self.inner: Backend = _deepspeed_class()(inner_manifest, settings)
        else:
            from lastmile.runtime.backends.onnx_backend import OnnxBackend

            self.inner = OnnxBackend(inner_manifest, settings)
            graph_inputs = set(getattr(self.inner, "_inputs", {}))
            if not {"input_ids", "attention_mask"} <= graph_inputs:
                raise BackendError(f"model {manifest.name!r}: the ONNX graph takes {sorted(graph_inputs)}; a text "
                                   "model's graph must take input_ids and attention_mask")
            self._extra_zeros = sorted(graph_inputs - {"input_ids", "attention_mask"})  # token_type_ids
        self._extra_zeros = getattr(self, "_extra_zeros", [])
        from lastmile.models.hf import token_types

        if backend_name == "deepspeed" and token_types(hf):
            self._extra_zeros = ["token_type_ids"]
        self._types = token_types(hf)  # how many segment ids the model takes (0: no token_type_ids input)
        self.max_length = hf.max_length or 512
        self.tokenizer = self.counter = None
        if hf.tokenizer is not None:
            self.tokenizer, self.counter = self._tokenizers(Path(manifest.hf.path) / hf.tokenizer.file)
        self._kind = getattr(self.inner, "_kind", "cpu")  # the runner reads it for the memory cap

    def _tokenizers(self, file: Path) -> tuple[Any, Any]:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(file))
            counter = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise BackendError(f"model {self.manifest.name!r}: {file.name} could not be read by the tokenizers "
                               f"library: {exc}") from exc
        info = self.hf.tokenizer
        tok.enable_truncation(self.max_length)
        tok.enable_padding(direction=info.padding_side, pad_id=info.pad_id or 0, pad_token=info.pad_token or "[PAD]")
        counter.no_truncation()
        counter.no_padding()
        return tok, counter

    # --- one batch --------------------------------------------------------------------------

    def _texts(self, data: np.ndarray, lengths: np.ndarray) -> list[str]:
        width = data.shape[1]
        out = []
        for row, n in zip(data, lengths.tolist()):
            n = min(max(int(n), 0), width)
            out.append(bytes(row[:n]).decode("utf-8", errors="replace"))
        return out

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.tokenizer is None:
            raise BackendError(f"model {self.manifest.name!r} has no tokenizer.json: send input_ids instead of text")
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        counts = mask.sum(axis=1).astype(np.int32)
        for i, e in enumerate(encodings):
            if e.overflowing:  # truncated: count the whole text (only these pay a second pass)
                counts[i] = len(self.counter.encode(texts[i]).ids)
        return ids, mask, counts

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        types = None
        if "input_ids" in inputs:
            ids = np.asarray(inputs["input_ids"], dtype=np.int64)
            mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
            if "token_type_ids" in inputs:
                if not self._types:
                    raise BackendError(f"model {self.manifest.name!r} ({self.hf.model_type}) takes no token_type_ids")
                types = np.asarray(inputs["token_type_ids"], dtype=np.int64)
                if types.shape != ids.shape:
                    raise BackendError(f"token_type_ids shape {list(types.shape)} differs from input_ids {list(ids.shape)}")
                if types.size and (types.min() < 0 or types.max() >= self._types):
                    raise BackendError(f"token_type_ids must be in 0..{self._types - 1}")
            counts = mask.sum(axis=1).astype(np.int32)
            if ids.shape[1] > self.max_length:
                ids, mask = ids[:, : self.max_length], mask[:, : self.max_length]
                types = types[:, : self.max_length] if types is not None else None
            vocab = self.hf.vocab_size
            if vocab and ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise BackendError(f"input_ids must be in 0..{vocab - 1}")
        else:
            ids, mask, counts = self._tokenize(self._texts(np.asarray(inputs["text_utf8"]), np.asarray(inputs["text_len"])))
        feeds = {"input_ids": ids, "attention_mask": mask}
        for name in self._extra_zeros:
            feeds[name] = types if name == "token_type_ids" and types is not None else np.zeros_like(ids)
        result = self.inner.run(feeds)
        out: dict[str, np.ndarray] = {"token_count": counts}
        task = self.hf.task
        if task == "feature-extraction":
            hidden = result.get("last_hidden_state")
            if hidden is None:
                hidden = next(iter(result.values()))
            hidden = hidden.astype(np.float32, copy=False)
            emb = pool(hidden, mask, self.hf.pooling.modes if self.hf.pooling else ("mean",))
            out["embeddings"] = normalize(emb) if self.hf.normalize else emb
            if HIDDEN_FLAG in inputs:
                out["last_hidden_state"] = np.ascontiguousarray(hidden)
        else:
            logits = result.get("logits")
            if logits is None:
                logits = next(iter(result.values()))
            logits = logits.astype(np.float32, copy=False)
            out["logits"] = logits
            out["scores"] = (sigmoid(logits) if self.hf.multi_label else softmax(logits)).astype(np.float32)
        return out

    # --- the rest is the inner backend's ----------------------------------------------------

    def memory(self) -> dict[str, int]:
        return self.inner.memory()

    def shrink(self) -> None:
        self.inner.shrink()

    def info(self) -> dict[str, Any]:
        info = dict(self.inner.info())
        info["text"] = {"task": self.hf.task, "max_length": self.max_length,
                        "tokenizer": "tokenizers" if self.tokenizer is not None else None,
                        "pooling": list(self.hf.pooling.modes) if self.hf.pooling else None,
                        "normalize": self.hf.normalize}
        return info

    def close(self) -> None:
        self.inner.close()
