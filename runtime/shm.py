"""Shared-memory buffers that carry tensors between the daemon and its runner processes.

Why files in ``/dev/shm`` opened with ``os.open`` + ``mmap`` and not
``multiprocessing.shared_memory.SharedMemory``: on Python < 3.13 every ``SharedMemory`` -
even one a child only *attaches* to - is registered with the resource tracker, which then
unlinks it (and warns about "leaked" segments) when any process using it exits; a runner
dying would tear the daemon's buffers away. Plain tmpfs files are the same POSIX shared
memory (``shm_open`` is a file in ``/dev/shm`` on Linux) with no tracker involved, so the
only owner is the :class:`BufferPool` in the daemon, which unlinks on :meth:`BufferPool.close`,
on interpreter exit and - for a daemon that was SIGKILLed - through :func:`cleanup_stale` at
the next start.

Ownership: the daemon creates every segment; runners only map them (and cache the mapping
by name, names are never reused). So a runner that dies can leak nothing.

Sizes come in power-of-two classes (>= one page) so a released buffer fits the next batch of
a similar size: steady-state serving allocates no new segments (``stats()["hit_rate"]`` goes
to 1.0). Space is reserved with ``posix_fallocate`` when a segment is created, so a full
``/dev/shm`` is a clean :class:`ShmError` instead of a SIGBUS on first write.

Layouts (which tensor lives where) are small tuples sent over the control pipe:
``((name, dtype_str, shape, offset), ...)``; :func:`views` turns one back into arrays over
the mapping without copying.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import re
import threading
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from lastmile.runtime.errors import ShmError

SHM_DIR = Path("/dev/shm")
PREFIX_ROOT = "lastmile-"
MIN_CLASS = 4096  # one page: the smallest segment worth a file
ALIGN = 64  # each tensor starts on a cache line (and satisfies every dtype's alignment)
DEFAULT_MAX_IDLE_BYTES = 256 * 1024 * 1024

# (tensor name, numpy dtype str e.g. '<f4', shape, byte offset in the segment)
TensorSlot = tuple[str, str, tuple[int, ...], int]
Layout = tuple[TensorSlot, ...]

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_pool_serial = itertools.count(1)


class PoolFull(ShmError):
    """The pool's byte cap (``BufferPool.max_bytes``: the model's memory headroom) leaves no
    room for this buffer even after unlinking idle ones; the batch fails alone (503)."""


def size_class(nbytes: int) -> int:
    """The segment size a request of ``nbytes`` is served from: the next power of two, at
    least one page."""
    if nbytes < 0:
        raise ValueError(f"nbytes: got {nbytes}; must be >= 0")
    return max(MIN_CLASS, 1 << max(0, nbytes - 1).bit_length())


def default_prefix(tag: str = "pool") -> str:
    """``lastmile-<pid>-<tag>-``: the naming :func:`cleanup_stale` understands."""
    return f"{PREFIX_ROOT}{os.getpid()}-{tag}-"


# --- layouts -------------------------------------------------------------------------------


def plan_layout(tensors: Iterable[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[Layout, int]:
    """Place tensors one after another (aligned); returns the layout and the bytes it spans."""
    slots: list[TensorSlot] = []
    offset = 0
    for name, dtype, shape in tensors:
        if not isinstance(dtype, np.dtype):
            dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise ShmError(f"{name}: dtype {dtype} holds Python objects and cannot cross processes")
        shape = tuple(map(int, shape))
        offset = (offset + ALIGN - 1) & ~(ALIGN - 1)
        slots.append((name, dtype.str, shape, offset))
        offset += math.prod(shape) * dtype.itemsize
    return tuple(slots), offset


_DTYPE_STR: dict[np.dtype, str] = {}


def _dtype_str(dtype: np.dtype, name: str) -> str:
    """``dtype.str`` (computed anew by NumPy on every access: cached here, hot path)."""
    text = _DTYPE_STR.get(dtype)
    if text is None:
        if dtype.hasobject:
            raise ShmError(f"{name}: dtype {dtype} holds Python objects and cannot cross processes")
        text = _DTYPE_STR[dtype] = dtype.str
    return text


def layout_of(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, int]:
    """The layout that :func:`pack` would use for ``arrays`` (same result as
    :func:`plan_layout`, on the hot path of every batch)."""
    slots: list[TensorSlot] = []
    offset = 0
    for name, arr in arrays.items():
        offset = (offset + ALIGN - 1) & -ALIGN
        slots.append((name, _dtype_str(arr.dtype, name), arr.shape, offset))
        offset += arr.nbytes
    return tuple(slots), offset


def views(mem: mmap.mmap | memoryview, layout: Layout, *, readonly: bool = False) -> dict[str, np.ndarray]:
    """Arrays over ``mem`` (an mmap, a :class:`Buffer`'s ``mm``) as described by ``layout``;
    no copy. ``readonly`` marks them unwritable (what a backend receives)."""
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, offset in layout:
        arr = np.ndarray(shape, dtype=dtype, buffer=mem, offset=offset)
        if readonly:
            arr.flags.writeable = False
        out[name] = arr
    return out


def pack(arrays: Mapping[str, np.ndarray], mem: mmap.mmap | memoryview, layout: Layout | None = None) -> Layout:
    """Copy ``arrays`` into ``mem`` (one copy each, any input strides) and return the layout."""
    if layout is None:
        layout, total = layout_of(arrays)
        if total > len(mem):
            raise ShmError(f"tensors need {total} bytes but the buffer holds {len(mem)}")
    for (name, dtype, shape, offset) in layout:
        src = arrays[name]
        dest = np.ndarray(shape, dtype=dtype, buffer=mem, offset=offset)
        if _dtype_str(src.dtype, name) != dtype or src.shape != shape:
            raise ShmError(f"{name}: array is {src.dtype}{list(src.shape)} but the layout says {dtype}{list(shape)}")
        dest[...] = src
    return layout


class PackedArrays(dict):
    """Arrays that already live in one pool buffer (``buffer``, ``layout``): what the
    batcher builds when it concatenates a batch straight into shared memory, so the runner
    sends the layout instead of copying the batch again. A plain dict to everyone else."""

    __slots__ = ("buffer", "layout")

    def __init__(self, buffer: "Buffer", layout: Layout, arrays: dict[str, np.ndarray]) -> None:
        super().__init__(arrays)
        self.buffer = buffer
        self.layout = layout


# --- segments ------------------------------------------------------------------------------


class Buffer:
    """One shared-memory segment lent out by a :class:`BufferPool`.

    ``size`` is the segment's capacity (its size class). ``refs`` counts holders: the pool
    takes it back only when the last holder released it (a runner retains the batcher's
    input buffer while its child may still read it, even if the caller was cancelled).
    """

    __slots__ = ("name", "size", "mm", "refs", "path", "__weakref__")

    def __init__(self, name: str, size: int, mm: mmap.mmap, path: Path) -> None:
        self.name = name
        self.size = size
        self.mm = mm
        self.refs = 0
        self.path = path

    def _destroy(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            self.mm.close()
        except BufferError:
            # Arrays still view it: the mapping goes away with them; the file is gone already.
            pass

    def __repr__(self) -> str:
        return f"Buffer({self.name!r}, size={self.size}, refs={self.refs})"


def _create_segment(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            try:
                free = os.statvfs(path.parent)
                avail = free.f_bavail * free.f_frsize
            except OSError:
                avail = -1
            os.unlink(path)
            raise ShmError(
                f"cannot reserve {size} bytes of shared memory in {path.parent} "
                f"({avail} bytes free): {exc.strerror or exc}"
            ) from None
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _unlink_all(paths: set[str], owner_pid: int) -> None:
    """Finalizer: unlink what is left, but only in the process that created it (a forked
    child inheriting the pool object must not remove the parent's segments)."""
    if os.getpid() != owner_pid:
        return
    for p in list(paths):
        try:
            os.unlink(p)
        except OSError:
            pass
    paths.clear()


class BufferPool:
    """Power-of-two size-classed shared-memory buffers, reused across batches.

    Thread-safe (one lock, held for dictionary operations only). ``max_idle_bytes`` caps what
    is kept for reuse; a released buffer beyond it is unlinked at once.

    Runners cache mappings of segments by name; when the pool unlinks segments it records
    them so each runner can tell its child to unmap them (see :meth:`unlinked_since`):
    otherwise a child's stale mapping would keep the memory alive.
    """

    def __init__(
        self,
        name_prefix: str | None = None,
        max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES,
        *,
        shm_dir: Path | str = SHM_DIR,
    ) -> None:
        if max_idle_bytes < 0:
            raise ValueError(f"max_idle_bytes: got {max_idle_bytes}; must be >= 0")
        prefix = _SAFE.sub("_", name_prefix if name_prefix is not None else default_prefix())
        self.prefix = f"{prefix[:180]}p{next(_pool_serial)}-"
        self.max_idle_bytes = max_idle_bytes
        # Cap on all segments (in use + idle), None = none: set by the memory manager from the
        # model's headroom, so the pool cannot take the model past its memory_limit_mb.
        self.max_bytes: int | None = None
        self.shm_dir = Path(shm_dir)
        if not self.shm_dir.is_dir():
            raise ShmError(f"shared memory directory {self.shm_dir} does not exist")
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._idle: dict[int, list[Buffer]] = {}
        self._in_use: dict[str, Buffer] = {}
        self._paths: set[str] = set()
        self._bytes_idle = 0
        self._bytes_in_use = 0
        self._hits = 0
        self._misses = 0
        self._unlinked_total = 0
        self._epoch = 0
        self._unlinked: deque[tuple[int, str]] = deque(maxlen=4096)
        self.closed = False
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths, os.getpid())

    # --- lending ---------------------------------------------------------------------------

    def acquire(self, nbytes: int) -> Buffer:
        """A buffer of at least ``nbytes`` (reused when one of its size class is idle)."""
        cls = size_class(nbytes)
        with self._lock:
            if self.closed:
                raise ShmError("buffer pool is closed")
            idle = self._idle.get(cls)
            if idle:
                buf = idle.pop()
                self._bytes_idle -= cls
                self._hits += 1
                buf.refs = 1
                self._in_use[buf.name] = buf
                self._bytes_in_use += cls
                return buf
            self._misses += 1
            victims = self._room_for(cls) if self.max_bytes is not None else ()
            name = f"{self.prefix}{next(self._counter)}"
        for victim in victims:
            victim._destroy()
        path = self.shm_dir / name
        mm = _create_segment(path, cls)  # outside the lock: fallocate touches every page
        buf = Buffer(name, cls, mm, path)
        buf.refs = 1
        with self._lock:
            if self.closed:
                buf._destroy()
                raise ShmError("buffer pool is closed")
            self._paths.add(str(path))
            self._in_use[name] = buf
            self._bytes_in_use += cls
        return buf

    def retain(self, buf: Buffer) -> Buffer:
        """One more holder of ``buf``; each ``retain`` needs its own :meth:`release`."""
        with self._lock:
            if buf.refs <= 0:
                raise ShmError(f"buffer {buf.name} was already released")
            buf.refs += 1
        return buf

    def release(self, buf: Buffer) -> None:
        """Give ``buf`` back; the last release makes it idle (or unlinks it when the idle cap
        is reached or the pool is closed)."""
        with self._lock:
            if buf.refs <= 0:
                raise ShmError(f"buffer {buf.name} released twice")
            buf.refs -= 1
            if buf.refs:
                return
            if self._in_use.pop(buf.name, None) is None:
                return  # pool closed meanwhile and already destroyed it
            self._bytes_in_use -= buf.size
            if self.closed or self._bytes_idle + buf.size > self.max_idle_bytes:
                self._forget(buf)
                destroy = True
            else:
                self._idle.setdefault(buf.size, []).append(buf)
                self._bytes_idle += buf.size
                destroy = False
        if destroy:
            buf._destroy()

    def owns(self, buf: Buffer) -> bool:
        return self._in_use.get(buf.name) is buf

    def fits_twice(self) -> bool:
        """Whether what is lent out now could be lent out once more under ``max_bytes``: the
        batcher sends a second batch to a busy runner only then, so pipelining never turns
        into a :class:`PoolFull` under a tight memory limit."""
        return self.max_bytes is None or 2 * self._bytes_in_use <= self.max_bytes

    # --- giving memory back ----------------------------------------------------------------

    def _forget(self, buf: Buffer) -> None:
        """Bookkeeping for a buffer about to be destroyed (lock held)."""
        self._paths.discard(str(buf.path))
        self._epoch += 1
        self._unlinked.append((self._epoch, buf.name))
        self._unlinked_total += 1

    def _room_for(self, cls: int) -> list[Buffer]:
        """Idle buffers to unlink (largest first) so that a new ``cls`` segment fits under
        ``max_bytes``; raises :class:`PoolFull` when even that is not enough (lock held)."""
        cap = self.max_bytes or 0
        if self._bytes_in_use + cls > cap:
            raise PoolFull(f"a {cls}-byte buffer does not fit the pool's cap of {cap} bytes "
                           f"({self._bytes_in_use} bytes lent out): the batch is too large for the model's memory limit")
        victims: list[Buffer] = []
        for size in sorted(self._idle, reverse=True):
            bucket = self._idle[size]
            while bucket and self._bytes_in_use + self._bytes_idle + cls > cap:
                buf = bucket.pop()
                self._bytes_idle -= size
                self._forget(buf)
                victims.append(buf)
        return victims

    def shrink(self, keep_bytes: int = 0) -> int:
        """Unlink idle buffers (largest first) until at most ``keep_bytes`` stay idle; returns
        the bytes unlinked. Runners learn of it through :meth:`unlinked_since`."""
        victims: list[Buffer] = []
        with self._lock:
            for cls in sorted(self._idle, reverse=True):
                bucket = self._idle[cls]
                while bucket and self._bytes_idle > keep_bytes:
                    buf = bucket.pop()
                    self._bytes_idle -= cls
                    self._forget(buf)
                    victims.append(buf)
            self._idle = {c: b for c, b in self._idle.items() if b}
        for buf in victims:
            buf._destroy()
        return sum(b.size for b in victims)

    def unlinked_since(self, epoch: int) -> tuple[tuple[str, ...] | None, int]:
        """Names unlinked after ``epoch`` and the current epoch. ``None`` instead of names
        means "too many to list, drop every cached mapping"."""
        with self._lock:
            current = self._epoch
            if epoch >= current:
                return (), current
            if not self._unlinked or self._unlinked[0][0] > epoch + 1:
                return None, current
            return tuple(n for e, n in self._unlinked if e > epoch), current

    @property
    def epoch(self) -> int:
        return self._epoch

    def close(self) -> None:
        """Unlink every segment, idle or lent (daemon exit, model unload). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            victims = [b for bucket in self._idle.values() for b in bucket] + list(self._in_use.values())
            self._idle.clear()
            self._in_use.clear()
            self._bytes_idle = self._bytes_in_use = 0
            for buf in victims:
                self._forget(buf)
        for buf in victims:
            buf._destroy()
        self._finalizer()

    def __enter__(self) -> "BufferPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self._hits + self._misses
            return {
                "prefix": self.prefix,
                "bytes_in_use": self._bytes_in_use,
                "bytes_idle": self._bytes_idle,
                "max_idle_bytes": self.max_idle_bytes,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "hit_rate": (self._hits / lookups) if lookups else 1.0,
                "segments": len(self._in_use) + sum(len(b) for b in self._idle.values()),
                "segments_in_use": len(self._in_use),
                "unlinked": self._unlinked_total,
                "idle_by_class": {c: len(b) for c, b in sorted(self._idle.items()) if b},
                "closed": self.closed,
            }


# --- the runner side: mapping segments by name --------------------------------------------


class SegmentCache:
    """A runner child's mappings of the daemon's segments, by name (names are never reused,
    so a cached mapping is always the right one until the pool says it was unlinked)."""

    def __init__(self, shm_dir: Path | str = SHM_DIR) -> None:
        self.shm_dir = Path(shm_dir)
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, name: str) -> mmap.mmap:
        mm = self._maps.get(name)
        if mm is None:
            if "/" in name or name.startswith("."):
                raise ShmError(f"bad segment name {name!r}")
            try:
                fd = os.open(self.shm_dir / name, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ShmError(f"shared memory segment {name} does not exist (unlinked by the daemon?)") from None
            try:
                mm = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            self._maps[name] = mm
        return mm

    def drop(self, names: Iterable[str] | None) -> None:
        """Unmap ``names`` (``None``: all). A mapping still viewed by an array is left to GC."""
        for name in list(self._maps) if names is None else names:
            mm = self._maps.pop(name, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass

    def __len__(self) -> int:
        return len(self._maps)


# --- cleanup of segments left by a dead daemon --------------------------------------------


def _process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of ``pid``, or None when there is no such process."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # NoSuchProcess, AccessDenied (exists), psutil missing
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0.0
        return 0.0


def cleanup_stale(prefix_root: str = PREFIX_ROOT, *, shm_dir: Path | str = SHM_DIR, grace_s: float = 2.0) -> list[str]:
    """Unlink segments ``<prefix_root><pid>-...`` whose daemon is gone. A segment is stale when
    its pid no longer exists, or exists but started after the segment was made (a restarted
    daemon got a recycled pid, typical in containers where it is always the same). Returns
    the names removed; call it once at daemon start before creating pools."""
    root = Path(shm_dir)
    removed: list[str] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    starts: dict[int, float | None] = {}
    for entry in entries:
        if not entry.name.startswith(prefix_root):
            continue
        pid_text = entry.name[len(prefix_root):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid not in starts:
            starts[pid] = _process_start_time(pid)
        started = starts[pid]
        try:
            made = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if started is None or (started > 0 and made < started - grace_s):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def count_segments(prefix: str, shm_dir: Path | str = SHM_DIR) -> int:
    """How many entries in ``/dev/shm`` start with ``prefix`` (leak checks, metrics)."""
    try:
        return sum(1 for e in os.scandir(shm_dir) if e.name.startswith(prefix))
    except FileNotFoundError:
        return 0


__all__ = [
    "ALIGN",
    "Buffer",
    "BufferPool",
    "Layout",
    "PackedArrays",
    "PoolFull",
    "SegmentCache",
    "cleanup_stale",
    "count_segments",
    "default_prefix",
    "layout_of",
    "pack",
    "plan_layout",
    "size_class",
    "views",
]
