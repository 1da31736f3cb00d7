"""The ``ort-genai`` engine: the ONNX Runtime GenAI builder's graph, run batched by Lastmile.

Why the builder's graph: its int4/int8 MatMulNBits and GroupQueryAttention kernels are several
times faster per core on CPU than torch fp32, with a fraction of the memory. Why not ORT-GenAI's
own loop: ``og.Engine`` on CPU has only static batching (a request arriving while a batch runs
waits for the whole batch; its paged continuous scheduler is CUDA fp16/bf16 only), and one
``og.Generator`` per sequence shares no matmul between sequences (16 streams got what one got:
~100 tokens/s on SmolLM2 int4, 2 cores). So this engine runs the graph with a plain
``onnxruntime.InferenceSession`` and IOBinding over a slot pool (:mod:`kv_slots`): the graph's
GroupQueryAttention shares past and present KV in one ``[slots, kv_heads, capacity,
head_dim]`` buffer and reads each row's length from the attention mask, so **one decode call
serves every running sequence** (a weight read shared by all rows), new sequences' prompts
are prefilled between decode calls (fresh short prompts together in one padded call; a long
one in chunks on its own, so running streams keep their pace), and a finished or cancelled
sequence leaves its slot at once. The logits are taken at one position per row (a ``GatherND``
put in front of the LM head when the graph is prepared), so a 256-token prefill chunk does not
compute 256 x vocabulary logits it would throw away.

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

import numpy as np

from lastmile.runtime.generation.engine import GenerationEngine, ModelShape
from lastmile.runtime.generation.kv_slots import KVSlots
from lastmile.runtime.generation.sampling import make_generator, sample
from lastmile.runtime.generation.types import SamplingParams

PRECISIONS = ("int4", "int8", "fp32")
CACHE_DIR = ".lastmile/ort-genai"
#: The builder's graph with one logits row per sequence (see ``prepare_graph``).
BATCHED_GRAPH = "model.batched.onnx"
LOGITS_INDEX = "logits_index"


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


def prepare_graph(og_folder: Path) -> Path:
    """The builder's ``model.onnx`` with the LM head fed one hidden state per row:
    ``GatherND(hidden [B, S, H], logits_index [B, 1], batch_dims=1)`` -> ``[B, 1, H]``. Written
    once beside it (weights stay in the builder's external data file), atomically."""
    import onnx
    from onnx import helper

    out = og_folder / BATCHED_GRAPH
    if out.is_file():
        return out
    model = onnx.load(str(og_folder / "model.onnx"), load_external_data=False)
    graph = model.graph
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None:
        raise RuntimeError(f"{og_folder / 'model.onnx'}: no node makes 'logits'")
    hidden = head.input[0]
    picked = hidden + "/last_per_row"
    graph.input.append(helper.make_tensor_value_info(LOGITS_INDEX, onnx.TensorProto.INT64, ["batch_size", 1]))
    graph.initializer.append(helper.make_tensor("logits_index_axes", onnx.TensorProto.INT64, [1], [1]))
    gather = helper.make_node("GatherND", [hidden, LOGITS_INDEX], [picked + "/2d"], name="/lastmile/GatherND",
                              batch_dims=1)
    unsq = helper.make_node("Unsqueeze", [picked + "/2d", "logits_index_axes"], [picked], name="/lastmile/Unsqueeze")
    head.input[0] = picked
    nodes = list(graph.node)
    at = nodes.index(head)
    del graph.node[:]
    graph.node.extend(nodes[:at] + [gather, unsq] + nodes[at:])
    tmp = out.with_name(f".{BATCHED_GRAPH}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out


class PrefixCache:
    """The KV of recent prompts' first tokens, in blocks of ``block`` tokens, for reuse.

    Why: a chat template puts the same system prompt before every conversation, and a
    conversation's next turn repeats all of its history; prefilling those tokens again costs a
    new sequence most of its time to first token (a prompt token costs about what a decode row
    does). A new sequence whose prompt starts with a kept prefix gets that prefix's KV copied
    into its slot (a memory copy: ~46 KB a token for SmolLM2) and prefills only the rest. The
    result is the same as prefilling it (the KV of a position depends only on the tokens up to
    it), so greedy output does not change (test). Bounded by ``max_bytes``, least recently used
    entries go first.
    """

    def __init__(self, bytes_per_token: int, max_bytes: int, block: int = 16) -> None:
        self.bytes_per_token, self.max_bytes, self.block = bytes_per_token, max_bytes, block
        self._entries: collections.OrderedDict[int, tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]] = \
            collections.OrderedDict()  # key (hash of the whole prefix) -> (tokens, per-layer K, V)
        self._index: dict[int, int] = {}  # hash of each block-aligned prefix -> the entry holding it
        self.bytes = 0
        self.hits = self.hit_tokens = 0

    def _hashes(self, tokens: list[int], limit: int) -> list[int]:
        """Hash of tokens[:block], tokens[:2 block], ... up to ``limit`` tokens."""
        out, h = [], 0
        for start in range(0, limit - limit % self.block, self.block):
            h = hash((h, tuple(tokens[start:start + self.block])))
            out.append(h)
        return out

    def lookup(self, prompt: list[int]) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None:
        """The longest kept prefix of ``prompt`` that leaves at least one token to prefill."""
        for j, h in reversed(list(enumerate(self._hashes(prompt, len(prompt) - 1)))):
            key = self._index.get(h)
            if key is None:
                continue
            n = (j + 1) * self.block
            tokens, kv = self._entries[key]
            if tokens[:n] != prompt[:n]:
                continue  # a hash collision
            self._entries.move_to_end(key)
            self.hits += 1
            self.hit_tokens += n
            return n, kv
        return None

    def add(self, prompt: list[int], read: Callable[[int], list[tuple[np.ndarray, np.ndarray]]]) -> None:
        """Keep ``prompt``'s longest block-aligned prefix (``read(n)`` copies its KV out)."""
        n = min(len(prompt) - 1, self.max_bytes // 4 // max(1, self.bytes_per_token))
        hashes = self._hashes(prompt, n)
        if not hashes or hashes[-1] in self._index:
            return
        n = len(hashes) * self.block
        while self._entries and self.bytes + n * self.bytes_per_token > self.max_bytes:
            self._evict()
        key = hashes[-1]
        self._entries[key] = (list(prompt[:n]), read(n))
        self.bytes += n * self.bytes_per_token
        for h in hashes:
            self._index.setdefault(h, key)

    def _evict(self) -> None:
        key, (tokens, _kv) = self._entries.popitem(last=False)
        self.bytes -= len(tokens) * self.bytes_per_token
        for h, owner in list(self._index.items()):
            if owner == key:
                del self._index[h]
        for h in self._hashes(tokens, len(tokens)):  # shorter prefixes another entry also holds
            if h not in self._index:
                for other, (t, _) in self._entries.items():
                    if len(t) >= len(tokens) and h in self._hashes(t, len(tokens)):
                        self._index[h] = other
                        break

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.bytes = 0


#: KV kept for prompt prefixes (``PrefixCache``), per model.
PREFIX_CACHE_BYTES = 64 << 20


class _Seq:
    """One sequence's place in the engine."""

    __slots__ = ("seq_id", "prompt", "params", "generator", "slot", "length", "next_input", "constraint")

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, constraint: Any = None) -> None:
        self.seq_id = seq_id
        self.constraint = constraint
        self.prompt = prompt
        self.params = params
        self.generator = make_generator(params)
        self.slot = -1
        self.length = 0  # positions in its KV slot
        self.next_input = -1  # the token the next decode call feeds


class OrtGenAIEngine(GenerationEngine):
    """The builder's graph under one ``InferenceSession``: one decode call per step for all
    running sequences, prefill between them, KV in :class:`KVSlots`."""

    name = "ort-genai"

    def __init__(self, og_folder: str | Path, *, shape: ModelShape, eos_token_ids: frozenset[int],
                 max_num_seqs: int = 8, max_context: int = 2048, threads: int = 0, precision: str = "int4",
                 prefill_chunk: int = 256, busy_prefill_chunk: int = 64, vocab_size: int = 0) -> None:
        super().__init__(max_num_seqs, max_context)
        import onnxruntime as ort

        self._ort = ort
        self.shape = shape
        self.precision = precision
        self.eos_token_ids = eos_token_ids
        self.folder = Path(og_folder)
        self.prefill_chunk = max(1, prefill_chunk)
        self.busy_prefill_chunk = max(1, min(busy_prefill_chunk, self.prefill_chunk))  # while others decode
        genai = json.loads((self.folder / "genai_config.json").read_text())["model"]
        decoder = genai["decoder"]
        self.vocab_size = int(genai.get("vocab_size") or vocab_size)
        self._past = [(decoder["inputs"]["past_key_names"] % i, decoder["inputs"]["past_value_names"] % i)
                      for i in range(int(decoder["num_hidden_layers"]))]
        self._present = [(decoder["outputs"]["present_key_names"] % i, decoder["outputs"]["present_value_names"] % i)
                         for i in range(int(decoder["num_hidden_layers"]))]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Threads spin between the graph's parallel sections, unlike the tensor runners'
        # (backends/threads.py): a step is one long call after another, and waking a sleeping
        # thread for each of its ~300 nodes cost SmolLM2 int8 at one sequence 12.0 -> 9.0 ms a step
        # in-process, 79-78 -> 93-84 tokens/s served (2-core box); at 16 streams no difference.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self._session = ort.InferenceSession(str(prepare_graph(self.folder)), options,
                                             providers=["CPUExecutionProvider"])
        self.threads = threads
        self.kv = KVSlots(len(self._past), max_num_seqs, int(decoder["num_key_value_heads"]), max_context,
                          int(decoder["head_size"]))
        self._logits = np.empty((max_num_seqs, 1, self.vocab_size), dtype=np.float32)
        self._bindings: dict[tuple[int, int], Any] = {}  # (first slot, rows) -> IOBinding (_binding)
        self.prefixes = PrefixCache(self.kv.bytes_per_token, PREFIX_CACHE_BYTES)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []  # slot i holds _running[i]
        self._prefilling: list[_Seq] = []  # slots len(_running) .. len(_running) + len - 1, FIFO
        self.quality: dict[str, Any] | None = None  # how precision "auto" chose (quality.py)

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
    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, constraint: Any = None) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) > self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens > max_context {self.max_context}")
        self._waiting.append(_Seq(seq_id, list(prompt_ids), params, constraint))

    def step(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        if self._running:
            out.extend(self._decode())
        self._admit()
        if self._prefilling:
            out.extend(self._prefill(self._prefill_budget()))
        return out

    def _prefill_budget(self) -> int:
        """Prompt tokens this step. A prompt token costs about what a decode row does (SmolLM2
        int8, 2 cores: 16 prompt tokens 128 ms, 16 decode rows 192 ms), so while sequences run
        the chunk is about as many tokens as there are rows (at least 16, at most
        ``busy_prefill_chunk``): a step costs at most about twice a plain decode step, and a
        2,000-token prompt never holds the running streams for a whole 64-token chunk."""
        if not self._running:
            return self.prefill_chunk
        return max(16, min(self.busy_prefill_chunk, len(self._running)))

    def cancel(self, seq_id: int) -> None:
        for s in self._waiting:
            if s.seq_id == seq_id:
                self._waiting.remove(s)
                return
        for s in self._prefilling:
            if s.seq_id == seq_id:
                self._leave_prefilling(s)
                return
        for s in self._running:
            if s.seq_id == seq_id:
                self._leave_running(s)
                return

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def stats(self) -> dict[str, int]:
        held = sum(s.length for s in self._running) + sum(s.length for s in self._prefilling)
        return {"running": len(self._running) + len(self._prefilling), "waiting": len(self._waiting),
                "kv_used_bytes": held * self.kv.bytes_per_token,
                "kv_reserved_bytes": self.max_num_seqs * self.max_context * self.kv.bytes_per_token,
                "prefix_cache_bytes": self.prefixes.bytes, "prefix_hits": self.prefixes.hits,
                "prefix_hit_tokens": self.prefixes.hit_tokens}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "precision": self.precision, "ort_genai_folder": str(self.folder),
                "runtime": f"onnxruntime {self._ort.__version__} InferenceSession, batched decode",
                "threads": self.threads, "prefill_chunk": self.prefill_chunk,
                "busy_prefill_chunk": self.busy_prefill_chunk, "kv_bytes_per_token": self.kv.bytes_per_token,
                "prefix_cache_max_bytes": self.prefixes.max_bytes,
                **({"precision_auto": self.quality} if self.quality else {})}

    def shrink(self) -> None:
        self.prefixes.clear()

    def close(self) -> None:
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self.prefixes.clear()
        self._bindings.clear()
        self._session = None
        self.kv.close()

    # --- slots -----------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_num_seqs:
            s = self._waiting.popleft()
            s.slot = len(self._running) + len(self._prefilling)
            self._prefilling.append(s)
            hit = self.prefixes.lookup(s.prompt)
            if hit is not None:  # its first tokens' KV from an earlier prompt: prefill the rest only
                n, kv = hit
                for (k, v), (pk, pv) in zip(self.kv.buffers, kv):
                    k[s.slot, :, :n] = pk[:, :n]
                    v[s.slot, :, :n] = pv[:, :n]
                s.length = n

    def _leave_running(self, s: _Seq) -> None:
        """Its slot takes the last running sequence, whose slot takes the last prefilling one."""
        last = self._running[-1]
        self.kv.move(last.slot, s.slot, last.length)
        last.slot = s.slot
        self._running[self._running.index(s)] = last
        self._running.pop()
        free = len(self._running)  # the slot the last running sequence left
        if self._prefilling:
            tail = max(self._prefilling, key=lambda p: p.slot)
            self.kv.move(tail.slot, free, tail.length)
            free, tail.slot = tail.slot, free
        self.kv.release(free)

    def _leave_prefilling(self, s: _Seq) -> None:
        self._prefilling.remove(s)
        tail = max(self._prefilling, key=lambda p: p.slot, default=None)
        free = s.slot
        if tail is not None and tail.slot > s.slot:
            self.kv.move(tail.slot, s.slot, tail.length)
            free, tail.slot = tail.slot, s.slot
        self.kv.release(free)

    def _start_running(self, s: _Seq) -> None:
        """A prefilled sequence takes the slot right after the running ones."""
        first = len(self._running)
        if s.slot != first:
            other = next(p for p in self._prefilling if p.slot == first)
            self.kv.swap(s.slot, first, s.length, other.length)
            other.slot, s.slot = s.slot, first
        self._prefilling.remove(s)
        self._running.append(s)

    # --- calls -----------------------------------------------------------------------------
    def _binding(self, first_slot: int, rows: int) -> Any:
        """The IOBinding of the KV slots [first_slot, first_slot + rows) and the logits: the same
        addresses at every call, so it is made once per (first_slot, rows) and a call binds only
        its three small inputs (binding the 2 x layers KV buffers anew at every call made SmolLM2
        int8's one-row step 8.35 ms instead of 7.49, its 16-row step 68.5 instead of 63.4)."""
        io = self._bindings.get((first_slot, rows))
        if io is not None:
            return io
        io = self._session.io_binding()
        shape = self.kv.shape(rows)
        for layer, ((pk, pv), (ok, ov)) in enumerate(zip(self._past, self._present)):
            k, v = self.kv.address(layer, 0, first_slot), self.kv.address(layer, 1, first_slot)
            io.bind_input(pk, "cpu", 0, np.float32, shape, k)
            io.bind_input(pv, "cpu", 0, np.float32, shape, v)
            io.bind_output(ok, "cpu", 0, np.float32, shape, k)
            io.bind_output(ov, "cpu", 0, np.float32, shape, v)
        logits = self._logits[:rows]
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._bindings[(first_slot, rows)] = io
        return io

    def _run(self, first_slot: int, ids: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
        """One graph call over slots [first_slot, first_slot + rows): logits ``[rows, vocab]``."""
        rows = ids.shape[0]
        io = self._binding(first_slot, rows)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input(LOGITS_INDEX, index)
        self._session.run_with_iobinding(io)
        return self._logits[:rows, 0]

    def _sample(self, seqs: list[_Seq], logits: np.ndarray) -> list[tuple[int, int]]:
        """Next token per sequence: one argmax for the greedy rows, the sampler for the others;
        a sequence whose sampling fails ends alone (``failed``), the others go on."""
        import torch

        greedy = logits.argmax(axis=-1)
        out = []
        for i, s in enumerate(seqs):
            if s.constraint is not None:  # its own row, masked: never the batch argmax
                try:
                    row = s.constraint.mask_numpy(logits[i])
                    tok = int(row.argmax()) if s.generator is None else sample(torch.from_numpy(row), s.params, s.generator)
                    s.constraint.consume(tok)
                except Exception as exc:  # noqa: BLE001 - this sequence's constraint, not the engine
                    self.failed.append((s.seq_id, f"constrained sampling failed: {type(exc).__name__}: {exc}"))
                    continue
            elif s.generator is None:
                tok = int(greedy[i])
            else:
                try:
                    tok = sample(torch.from_numpy(logits[i]), s.params, s.generator)
                except Exception as exc:  # noqa: BLE001 - this sequence's values, not the engine
                    self.failed.append((s.seq_id, f"sampling failed: {type(exc).__name__}: {exc}"))
                    continue
            s.next_input = tok
            out.append((s.seq_id, tok))
        return out

    def _decode(self) -> list[tuple[int, int]]:
        for s in [s for s in self._running if s.length >= self.kv.capacity]:  # the scheduler's bound, held here too
            self.failed.append((s.seq_id, f"the sequence filled its KV slot ({self.kv.capacity} tokens)"))
            self._leave_running(s)
        if not self._running:
            return []
        rows = self._running
        lengths = np.fromiter((s.length for s in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max()) + 1
        mask = (np.arange(width, dtype=np.int64)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.fromiter((s.next_input for s in rows), dtype=np.int64, count=len(rows)).reshape(-1, 1)
        logits = self._run(0, ids, mask, np.zeros((len(rows), 1), dtype=np.int64))
        for s in rows:
            s.length += 1
        before = len(self.failed)
        out = self._sample(list(rows), logits)
        for seq_id, _why in self.failed[before:]:
            self.cancel(seq_id)
        return out

    def _prefill(self, budget: int) -> list[tuple[int, int]]:
        """Up to ``budget`` prompt tokens: fresh prompts that fit together in one padded call,
        else chunks, the sequence with the fewest prompt tokens left first.

        Short before long: a 2,000-token prompt that arrived first must not hold the short
        prompts behind it for its whole prefill (measured: 7.4 s TTFT for 4 chat streams beside
        one, FIFO); the long one still gets whatever budget the short ones leave each step, except
        in a step where a sequence started: its first token is not held back by another's chunk
        (4 prompts with a cached prefix beside a 2,000-token one: their first tokens waited 411 ms
        for a 188-token chunk of it in the same step)."""
        fresh: list[_Seq] = []
        for s in sorted(self._prefilling, key=lambda p: p.slot):
            if s.length or len(s.prompt) > budget:
                continue
            if fresh and s.slot != fresh[-1].slot + 1:
                break  # one call needs consecutive slots
            width = max([len(f.prompt) for f in fresh] + [len(s.prompt)])
            if width * (len(fresh) + 1) > budget:
                break
            fresh.append(s)
        if fresh:
            return self._prefill_fresh(fresh)
        out: list[tuple[int, int]] = []
        for s in sorted(self._prefilling, key=lambda p: (len(p.prompt) - p.length, p.slot)):
            left = len(s.prompt) - s.length
            if budget <= 0 or (out and left > budget):
                break  # first tokens are ready: they go out before a longer prompt's next chunk
            n = min(budget, left)
            budget -= n
            ids = np.asarray([s.prompt[s.length:s.length + n]], dtype=np.int64)
            mask = np.ones((1, s.length + n), dtype=np.int64)
            logits = self._run(s.slot, ids, mask, np.asarray([[n - 1]], dtype=np.int64))
            s.length += n
            if s.length == len(s.prompt):
                out.extend(self._started([s], logits))
        return out

    def _prefill_fresh(self, seqs: list[_Seq]) -> list[tuple[int, int]]:
        width = max(len(s.prompt) for s in seqs)
        ids = np.full((len(seqs), width), 0, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s.prompt)] = s.prompt
            mask[i, :len(s.prompt)] = 1
        index = np.asarray([[len(s.prompt) - 1] for s in seqs], dtype=np.int64)
        logits = self._run(seqs[0].slot, ids, mask, index)
        for s in seqs:
            s.length = len(s.prompt)
        return self._started(seqs, logits)

    def _started(self, seqs: list[_Seq], logits: np.ndarray) -> list[tuple[int, int]]:
        before = len(self.failed)
        out = self._sample(seqs, logits)
        failed = {seq_id for seq_id, _ in self.failed[before:]}
        for s in seqs:
            self.prefixes.add(s.prompt, lambda n, slot=s.slot: [(k[slot, :, :n].copy(), v[slot, :, :n].copy())
                                                                for k, v in self.kv.buffers])
            if s.seq_id in failed:
                self._leave_prefilling(s)
            else:
                self._start_running(s)
        return out
