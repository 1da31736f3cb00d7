"""The DeepSpeed/torch engine: an HF causal LM driven by Lastmile's iteration-level scheduler.

Why our own scheduler: transformers' ``generate`` runs one fixed batch to its end, and its own
continuous batching ran 2.4x slower than a padded static batch on CPU here. This engine keeps
one left-padded batched KV cache (a transformers ``DynamicCache`` whose layers append in place)
for the running sequences:

* new sequences are prefilled *after* the running sequences' decode step: fresh prompts that
  fit ``busy_group_tokens`` together (``prefill_chunk`` when nothing else runs) in one
  left-padded call (a prompt token costs 1.8-2 ms in a group of 4-16 prompts of 40 tokens,
  3.4 ms alone: SmolLM2 fp32, 2 threads), a longer prompt alone in its own cache in chunks of
  at most ``busy_prefill_chunk`` tokens per step while others decode, so a 2,000-token prompt
  costs the running streams one small chunk per token instead of the whole prompt
  (measured: a 256-token chunk made their inter-token latency 10x the steady one);
* when a prefill ends its rows are merged into the batch (both sides left-padded to one
  length, with the attention mask marking the padding) and decode with the others;
* a sequence that ends or is cancelled is removed from the batch dimension at once and the
  columns that became padding for every row are trimmed, so its KV memory goes back;
* the batched cache appends in place (:func:`growing_layer_class`): ``DynamicCache`` concatenates,
  copying every row's whole KV at every step, which was half of a 16-row decode step here.

The model goes through ``deepspeed.init_inference`` (always with an explicit dtype; kernel
injection only on CUDA). On CPU that is plain torch, and fp32 greedy output equals
``transformers.generate`` token for token (tests/generation).
"""

from __future__ import annotations

import collections
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lastmile.runtime.generation.engine import GenerationEngine, ModelShape
from lastmile.runtime.generation.sampling import make_generator, sample
from lastmile.runtime.generation.types import SamplingParams


@dataclass(slots=True)
class _Seq:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    generator: Any
    done: int = 0  # prompt tokens already in the KV cache
    cache: Any = None  # own DynamicCache while prefilling
    position: int = 0  # next position id
    next_input: int = -1  # token to feed at the next decode step
    constraint: Any = None  # constraints.SeqConstraint: masks the row before sample, consumes after
    extra: dict = field(default_factory=dict)


@functools.cache
def growing_layer_class() -> type:
    """The batched cache's layer class, made on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A batched cache layer whose keys/values are views of buffers with room to grow.

        ``update`` writes the new positions in place; the buffers grow (one copy) by a quarter
        of their length or ``ROOM`` positions, whichever is more, so a step costs no copy of the
        cache (``DynamicLayer`` copies it all with ``torch.cat`` at every step)."""

        ROOM = 64

        def __init__(self, keys: Any, values: Any) -> None:
            super().__init__()
            self.adopt(keys, values)

        def adopt(self, keys: Any, values: Any) -> None:
            """Take ``keys``/``values`` ``[B, H, L, D]`` as the layer's contents (copied)."""
            self.is_initialized = True
            self.device, self.length = keys.device, keys.shape[-2]
            self._k, self._v = self._room(keys, self.length), self._room(values, self.length)
            self._views()

        def _room(self, t: Any, length: int, cap: int = 0) -> Any:
            b, h, _, d = t.shape
            buf = t.new_empty((b, h, max(cap, length + max(self.ROOM, length // 4)), d))
            buf[:, :, :length] = t[:, :, :length]
            return buf

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n = key_states.shape[-2]
            end = self.length + n
            if end > self._k.shape[-2]:
                self._k, self._v = self._room(self._k, self.length, end), self._room(self._v, self.length, end)
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        @property
        def capacity(self) -> int:
            return self._k.shape[-2]

    return GrowingLayer


_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


class TorchEngine(GenerationEngine):
    """HF causal LM + our scheduler; ``use_deepspeed`` wraps the module with ``init_inference``."""

    name = "deepspeed"

    def __init__(self, folder: str | Path, *, max_num_seqs: int = 8, max_context: int = 2048,
                 dtype: str = "fp32", device: str = "cpu", prefill_chunk: int = 256,
                 busy_prefill_chunk: int = 32, busy_group_tokens: int = 128, use_deepspeed: bool = True,
                 threads: int | None = None) -> None:
        super().__init__(max_num_seqs, max_context)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.dtype = getattr(torch, _DTYPES.get(dtype, "float32"))
        self.prefill_chunk = max(1, prefill_chunk)
        self.busy_prefill_chunk = max(1, min(busy_prefill_chunk, self.prefill_chunk))
        self.busy_group_tokens = max(self.busy_prefill_chunk, min(busy_group_tokens, self.prefill_chunk))
        config = AutoConfig.from_pretrained(folder)
        self.shape = ModelShape.from_config(config)
        if max_context > self.shape.max_position_embeddings:
            raise ValueError(f"max_context {max_context} > the model's max_position_embeddings "
                             f"{self.shape.max_position_embeddings}")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).eval()
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else config.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.deepspeed = False
        if use_deepspeed:
            model = self._init_inference(model, device)
        self._model = model
        self._dtype_bytes = torch.finfo(self.dtype).bits // 8
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._prefilling: list[_Seq] = []
        self._running: list[_Seq] = []  # row order of the batched cache
        self._cache: Any = None  # batched DynamicCache of self._running
        self._mask: Any = None  # [B, L] long, 0 = left padding

    def _init_inference(self, model: Any, device: str) -> Any:
        from lastmile.runtime.accelerators import ensure_ds_accelerator

        ensure_ds_accelerator()
        import deepspeed

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = deepspeed.init_inference(
                model, dtype=self.dtype, replace_with_kernel_inject=device.startswith("cuda"),
                keep_module_on_host=device == "cpu" and os.environ.get("DS_ACCELERATOR") not in (None, "cpu"),
            )
        self.deepspeed = True
        return engine.module

    # --- the interface ---------------------------------------------------------------------
    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, constraint: Any = None) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self._waiting.append(_Seq(seq_id, list(prompt_ids), params, make_generator(params), constraint=constraint))

    @staticmethod
    def _choose(s: _Seq, row: Any) -> int:
        """The sequence's next token from its logits row (masked and consumed when constrained)."""
        if s.constraint is None:
            return sample(row, s.params, s.generator)
        tok = sample(s.constraint.mask_torch(row), s.params, s.generator)
        s.constraint.consume(tok)
        return tok

    def cancel(self, seq_id: int) -> None:
        for q in (self._waiting, self._prefilling):
            for s in list(q):
                if s.seq_id == seq_id:
                    q.remove(s)
                    s.cache = None
                    return
        for row, s in enumerate(self._running):
            if s.seq_id == seq_id:
                self._drop_rows([row])
                return

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def stats(self) -> dict[str, int]:
        per_tok = self.shape.kv_bytes_per_token(self._dtype_bytes)
        used = 0
        if self._cache is not None and self._running:
            # padding and the room to grow included: it is held
            used += self._mask.shape[0] * self._cache.layers[0].capacity * per_tok
        used += sum(s.done for s in self._prefilling) * per_tok
        return {"running": len(self._running) + len(self._prefilling), "waiting": len(self._waiting),
                "kv_used_bytes": int(used),
                "kv_reserved_bytes": int(self.max_num_seqs * self.max_context * per_tok)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "dtype": str(self.dtype).removeprefix("torch."),
                "deepspeed_init_inference": self.deepspeed, "prefill_chunk": self.prefill_chunk, "busy_prefill_chunk": self.busy_prefill_chunk,
                "busy_group_tokens": self.busy_group_tokens, "kv_bytes_per_token": self.shape.kv_bytes_per_token(self._dtype_bytes)}

    def close(self) -> None:
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self._cache = self._mask = self._model = None

    def step(self) -> list[tuple[int, int]]:
        torch = self._torch
        out: list[tuple[int, int]] = []
        with torch.inference_mode():
            if self._running:
                out.extend(self._decode())
            self._admit()
            if self._prefilling:
                out.extend(self._prefill())
        return out

    # --- scheduling ------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_num_seqs:
            self._prefilling.append(self._waiting.popleft())

    def _prefill(self) -> list[tuple[int, int]]:
        """Fresh prompts that fit the group budget together in one padded call, else up to the
        chunk budget of prompt tokens, the sequence with the fewest prompt tokens left first (a
        long prompt that came first does not hold the short ones behind it)."""
        torch = self._torch
        from transformers import DynamicCache

        group_budget = self.busy_group_tokens if self._running else self.prefill_chunk
        group: list[_Seq] = []
        for s in sorted(self._prefilling, key=lambda p: len(p.prompt) - p.done):
            if s.done or len(s.prompt) * (len(group) + 1) > group_budget:  # ascending: s is the longest
                break
            group.append(s)
        if group:
            return self._prefill_group(group)
        budget = self.busy_prefill_chunk if self._running else self.prefill_chunk
        out: list[tuple[int, int]] = []
        for s in sorted(self._prefilling, key=lambda p: len(p.prompt) - p.done):
            left = len(s.prompt) - s.done
            if budget <= 0 or (out and left > budget):
                break  # first tokens are ready: they go out before a longer prompt's next chunk
            n = min(budget, left)
            budget -= n
            if s.cache is None:
                s.cache = DynamicCache()
            ids = torch.tensor([s.prompt[s.done:s.done + n]], device=self.device)
            pos = torch.arange(s.done, s.done + n, device=self.device).unsqueeze(0)
            mask = torch.ones((1, s.done + n), dtype=torch.long, device=self.device)
            res = self._model(input_ids=ids, attention_mask=mask, position_ids=pos,
                              cache=s.cache, use_cache=True, logits_to_keep=1)
            s.done += n
            if s.done == len(s.prompt):
                out.extend(self._started([s], res.logits[:, -1], s.cache, mask))
                s.cache = None
        return out

    def _prefill_group(self, group: list[_Seq]) -> list[tuple[int, int]]:
        """Whole fresh prompts in one call, left-padded to the longest."""
        torch = self._torch
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, s in enumerate(group):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        res = self._model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                          logits_to_keep=1)
        for s in group:
            s.done = len(s.prompt)
        return self._started(group, res.logits[:, -1], cache, mask)

    def _started(self, seqs: list[_Seq], logits: Any, cache: Any, mask: Any) -> list[tuple[int, int]]:
        """First tokens of prefilled ``seqs`` (rows of ``cache``/``mask``); those whose sampling
        fails end alone, the others join the batch."""
        out, keep = [], []
        for i, s in enumerate(seqs):
            self._prefilling.remove(s)
            try:
                tok = self._choose(s, logits[i])
            except Exception as exc:  # noqa: BLE001 - this sequence's values: it ends alone
                self.failed.append((s.seq_id, f"sampling failed: {type(exc).__name__}: {exc}"))
                continue
            s.position = s.done
            s.next_input = tok
            keep.append(i)
            out.append((s.seq_id, tok))
        if keep:
            if len(keep) < len(seqs):
                idx = self._torch.tensor(keep, device=self.device)
                mask = mask.index_select(0, idx)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
            self._merge([seqs[i] for i in keep], cache, mask)
        return out

    def _decode(self) -> list[tuple[int, int]]:
        torch = self._torch
        rows = self._running
        ids = torch.tensor([[s.next_input] for s in rows], device=self.device)
        pos = torch.tensor([[s.position] for s in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        res = self._model(input_ids=ids, attention_mask=self._mask, position_ids=pos,
                          cache=self._cache, use_cache=True, logits_to_keep=1)
        logits = res.logits[:, -1]
        out = []
        failed = []
        for i, s in enumerate(rows):
            s.position += 1
            try:
                tok = self._choose(s, logits[i])
            except Exception as exc:  # noqa: BLE001 - this sequence's values: it ends, the batch goes on
                self.failed.append((s.seq_id, f"sampling failed: {type(exc).__name__}: {exc}"))
                failed.append(i)
                continue
            s.next_input = tok
            out.append((s.seq_id, tok))
        if failed:
            self._drop_rows(failed)
        return out

    # --- the batched cache -----------------------------------------------------------------
    def _merge(self, seqs: list[_Seq], cache: Any, new_mask: Any) -> None:
        """Append prefilled rows (``cache``, ``new_mask`` ``[rows, length]``), left-padding
        whichever side is shorter."""
        torch = self._torch
        new_len = new_mask.shape[1]
        if self._cache is None or not self._running:
            layer_class = growing_layer_class()
            cache.layers = [layer_class(layer.keys, layer.values) for layer in cache.layers]
            self._cache, self._mask, self._running = cache, new_mask, list(seqs)
            return
        cur_len = self._mask.shape[1]
        length = max(cur_len, new_len)

        def pad(t: Any, n: int) -> Any:  # left-pad dim -2 (keys/values) by n zeros
            if n == 0:
                return t
            shape = list(t.shape)
            shape[-2] = n
            return torch.cat([t.new_zeros(shape), t], dim=-2)

        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.adopt(torch.cat([pad(mine.keys, length - cur_len), pad(theirs.keys, length - new_len)], dim=0),
                       torch.cat([pad(mine.values, length - cur_len), pad(theirs.values, length - new_len)], dim=0))
        self._mask = torch.cat([
            torch.cat([self._mask.new_zeros((self._mask.shape[0], length - cur_len)), self._mask], dim=1),
            torch.cat([new_mask.new_zeros((new_mask.shape[0], length - new_len)), new_mask], dim=1),
        ], dim=0)
        self._running.extend(seqs)

    def _drop_rows(self, rows: list[int]) -> None:
        """Remove rows from the batch and trim the columns that are padding for every row."""
        torch = self._torch
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)
        first = int((mask.cumsum(dim=1) == 0).sum(dim=1).min().item())  # leading all-pad columns
        self._mask = mask[:, first:].contiguous()
        for layer in self._cache.layers:
            layer.adopt(layer.keys.index_select(0, idx)[:, :, first:], layer.values.index_select(0, idx)[:, :, first:])
