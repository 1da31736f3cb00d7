"""The ONNX Runtime GenAI engine: the default on CPU (int4 unless told otherwise).

Why: on CPU its int4/int8 kernels are several times faster per core than torch fp32
(SmolLM2-135M, one thread: HF fp32 13 tok/s, ORT-GenAI int4 75-90) with a quarter of the
memory. Why not its ``og.Engine``: on CPU it has only the static-batching scheduler (the
paged, continuous one is CUDA fp16/bf16 only), and there a request that arrives while a batch
runs waits until every sequence of that batch has finished (measured here: B's first token
came after all 30 of A's). So each sequence is an ``og.Generator`` of its own and Lastmile's
scheduler drives them: sequences join and leave between steps, and a long prompt is
appended in chunks of ``prefill_chunk`` tokens after the running sequences' token, so it
does not stall them. Greedy fp32 output equals transformers' (test).

The ORT-GenAI folder is built from the HF folder by ``onnxruntime_genai.models.builder`` at
first load, in a subprocess (the builder imports torch models and holds the whole fp32
model; none of that stays in the runner), and cached inside the model's folder under
``.lastmile/ort-genai/<precision>-<source hash>`` so that a changed source rebuilds and a
restart does not.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lastmile.runtime.generation.engine import GenerationEngine, ModelShape
from lastmile.runtime.generation.types import SamplingParams

PRECISIONS = ("int4", "int8", "fp32")
CACHE_DIR = ".lastmile/ort-genai"


def source_hash(folder: Path) -> str:
    """sha256 over the files the build reads (names, sizes, contents), first 16 hex digits;
    model.toml is Lastmile's, not the model's: editing its settings rebuilds nothing."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name != "model.toml":
            h.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
            with p.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()[:16]


def build_ort_genai(folder: str | Path, precision: str = "int4", *, threads: int = 0,
                    on_phase: Callable[[str, dict], None] | None = None, timeout_s: float = 1800.0) -> Path:
    """The ORT-GenAI folder for an HF causal-LM folder, built once and cached beside it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; known: {', '.join(PRECISIONS)}")
    src = Path(folder)
    digest = source_hash(src)
    out = src / CACHE_DIR / f"{precision}-{digest}"
    if (out / "genai_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{precision}-*"):  # an older build of a changed source
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{precision}-building-", dir=out.parent))
    started = time.monotonic()
    if on_phase:
        on_phase("building", {"engine": "ort-genai", "precision": precision, "source_hash": digest})
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp / "model"),
           "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not (tmp / "model" / "genai_config.json").is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise RuntimeError(f"ORT-GenAI build ({precision}) failed: " + " | ".join(tail))
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if on_phase:
        on_phase("built", {"engine": "ort-genai", "precision": precision, "build_s": round(time.monotonic() - started, 2)})
    return out


class OrtGenAIEngine(GenerationEngine):
    """One ``og.Generator`` per sequence over a shared ``og.Model``; FIFO admission into
    ``max_num_seqs`` slots; chunked prefill interleaved with decoding."""

    name = "ort-genai"

    def __init__(self, og_folder: str | Path, *, shape: ModelShape, eos_token_ids: frozenset[int],
                 max_num_seqs: int = 8, max_context: int = 2048, threads: int = 0, precision: str = "int4",
                 prefill_chunk: int = 256, busy_prefill_chunk: int = 32, vocab_size: int = 0) -> None:
        super().__init__(max_num_seqs, max_context)
        import onnxruntime_genai as og

        self._og = og
        self.shape = shape
        self.precision = precision
        self.eos_token_ids = eos_token_ids
        self.folder = Path(og_folder)
        self.prefill_chunk = max(1, prefill_chunk)
        self.busy_prefill_chunk = max(1, min(busy_prefill_chunk, self.prefill_chunk))  # while others decode
        self.vocab_size = vocab_size
        cfg = og.Config(str(og_folder))
        overlay: dict[str, Any] = {"search": {"max_length": max_context}}
        if threads:
            overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                "inter_op_num_threads": 1}}}
        cfg.overlay(json.dumps(overlay))
        self._model = og.Model(cfg)
        self._waiting: collections.deque[tuple[int, list[int], SamplingParams]] = collections.deque()
        self._prefilling: list[list[Any]] = []  # [seq_id, generator, prompt, done]
        self._running: dict[int, Any] = {}  # seq_id -> og.Generator, decoding
        self._tokens: dict[int, int] = {}  # seq_id -> tokens in its KV
        self._kv_dtype_bytes = 4  # CPU ORT-GenAI keeps the KV cache in fp32 (io dtype of int4/int8/fp32 CPU builds)

    @classmethod
    def from_hf_folder(cls, folder: str | Path, *, precision: str = "int4", max_num_seqs: int = 8,
                       max_context: int = 2048, threads: int = 0, prefill_chunk: int = 256,
                       on_phase: Callable[[str, dict], None] | None = None) -> "OrtGenAIEngine":
        cfg = json.loads((Path(folder) / "config.json").read_text())
        shape = ModelShape.from_config(cfg)
        if max_context > shape.max_position_embeddings:
            raise ValueError(f"max_context {max_context} > the model's max_position_embeddings "
                             f"{shape.max_position_embeddings}")
        gen_cfg_path = Path(folder) / "generation_config.json"
        eos = cfg.get("eos_token_id")
        if gen_cfg_path.is_file():
            eos = json.loads(gen_cfg_path.read_text()).get("eos_token_id", eos)
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        og_folder = build_ort_genai(folder, precision, threads=threads, on_phase=on_phase)
        return cls(og_folder, shape=shape, eos_token_ids=eos_ids, max_num_seqs=max_num_seqs,
                   max_context=max_context, threads=threads, precision=precision, prefill_chunk=prefill_chunk,
                   vocab_size=int(cfg.get("vocab_size") or 0))

    # --- the interface ---------------------------------------------------------------------
    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self._waiting.append((seq_id, list(prompt_ids), params))

    def _generator(self, params: SamplingParams) -> Any:
        og = self._og
        gp = og.GeneratorParams(self._model)
        options: dict[str, Any] = {"max_length": self.max_context, "do_sample": not params.greedy}
        if not params.greedy:
            options.update(temperature=float(params.temperature), top_p=float(params.top_p),
                           top_k=int(params.top_k) if params.top_k else max(1, self.vocab_size))
            if params.seed is not None:
                options["random_seed"] = int(params.seed)
        gp.set_search_options(**options)
        return og.Generator(self._model, gp)

    def _admit(self) -> None:
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_num_seqs:
            seq_id, ids, params = self._waiting.popleft()
            self._prefilling.append([seq_id, self._generator(params), ids, 0])
            self._tokens[seq_id] = 0

    def step(self) -> list[tuple[int, int]]:
        import numpy as np

        out: list[tuple[int, int]] = []
        for seq_id, gen in list(self._running.items()):  # the running streams first
            gen.generate_next_token()
            out.append((seq_id, int(gen.get_next_tokens()[0])))
            self._tokens[seq_id] += 1
        self._admit()
        budget = self.busy_prefill_chunk if self._running else self.prefill_chunk
        for item in list(self._prefilling):
            if budget <= 0:
                break
            seq_id, gen, ids, done = item
            n = min(budget, len(ids) - done)
            budget -= n
            gen.append_tokens(np.asarray(ids[done:done + n], dtype=np.int32))
            item[3] = done + n
            self._tokens[seq_id] = done + n
            if item[3] == len(ids):  # prompt in: its first token now, then it decodes with the rest
                self._prefilling.remove(item)
                gen.generate_next_token()
                out.append((seq_id, int(gen.get_next_tokens()[0])))
                self._tokens[seq_id] += 1
                self._running[seq_id] = gen
        return out

    def cancel(self, seq_id: int) -> None:
        for item in list(self._waiting):
            if item[0] == seq_id:
                self._waiting.remove(item)
                return
        for item in list(self._prefilling):
            if item[0] == seq_id:
                self._prefilling.remove(item)
        self._running.pop(seq_id, None)  # the generator and its KV buffers go with the last reference
        self._tokens.pop(seq_id, None)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def stats(self) -> dict[str, int]:
        per_tok = self.shape.kv_bytes_per_token(self._kv_dtype_bytes)
        return {"running": len(self._running) + len(self._prefilling), "waiting": len(self._waiting),
                "kv_used_bytes": int(sum(self._tokens.values()) * per_tok),
                "kv_reserved_bytes": int(self.max_num_seqs * self.max_context * per_tok)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "precision": self.precision, "ort_genai_folder": str(self.folder),
                "prefill_chunk": self.prefill_chunk, "busy_prefill_chunk": self.busy_prefill_chunk,
                "kv_bytes_per_token": self.shape.kv_bytes_per_token(self._kv_dtype_bytes)}

    def close(self) -> None:
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self._tokens.clear()
        self._model = None
