"""The KV cache of a batched engine as a pool of fixed slots, one per running sequence.

Why fixed slots: the ONNX graph's GroupQueryAttention takes its past and present KV as one
buffer (``past_present_share_buffer``) of shape ``[batch, kv_heads, capacity, head_dim]`` and
each row's length from the attention mask, so the rows ``[0, R)`` of a slot buffer are a
batch that one decode call serves, with no copy in or out. Running sequences are kept in the
lowest slots (a sequence that leaves is replaced by the last one: only its used positions
move), so a decode call is always a contiguous prefix.

Why an anonymous private mapping: the reserved buffer (slots x capacity) is virtual until a
sequence writes to it; a freed slot's pages go back to the OS at once (``MADV_DONTNEED``), so
the runner's memory follows the tokens really held, which is what the memory governor samples.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

#: Positions per slot are rounded up to this, so every slot starts on a page boundary.
ALIGN = 64


class KVSlots:
    """``layers`` x (K, V) buffers of ``[slots, kv_heads, capacity, head_dim]``."""

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: Any = np.float32) -> None:
        self.layers, self.slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.capacity = -(-capacity // ALIGN) * ALIGN
        self.dtype = np.dtype(dtype)
        self.slot_bytes = kv_heads * self.capacity * head_dim * self.dtype.itemsize
        self._maps: list[mmap.mmap] = []
        self.buffers: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(layers):
            pair = []
            for _kv in range(2):
                m = mmap.mmap(-1, self.slot_bytes * slots, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self._maps.append(m)
                pair.append(np.frombuffer(m, dtype=self.dtype).reshape(slots, kv_heads, self.capacity, head_dim))
            self.buffers.append((pair[0], pair[1]))
        self._base = [(int(k.ctypes.data), int(v.ctypes.data)) for k, v in self.buffers]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one position in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def reserved_bytes(self) -> int:
        return self.slot_bytes * self.slots * 2 * self.layers

    def address(self, layer: int, kind: int, slot: int) -> int:
        """Where slot ``slot`` of layer ``layer``'s K (kind 0) or V (kind 1) buffer starts."""
        return self._base[layer][kind] + slot * self.slot_bytes

    def shape(self, rows: int) -> list[int]:
        return [rows, self.kv_heads, self.capacity, self.head_dim]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for k, v in self.buffers:
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the used positions of two slots."""
        n = max(length_a, length_b)
        if a == b or n <= 0:
            return
        for k, v in self.buffers:
            for buf in (k, v):
                tmp = buf[a, :, :n].copy()
                buf[a, :, :n] = buf[b, :, :n]
                buf[b, :, :n] = tmp

    def release(self, slot: int) -> None:
        """Give a free slot's pages back to the OS (they read as zeros if touched again)."""
        for m in self._maps:
            m.madvise(mmap.MADV_DONTNEED, slot * self.slot_bytes, self.slot_bytes)

    def close(self) -> None:
        self.buffers = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still exported (a running call): freed with it
                pass
        self._maps = []
