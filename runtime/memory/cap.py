"""The hard line at a model's ``memory_limit_mb``, drawn inside its runner process.

Why ``RLIMIT_AS`` and how it is sized: the daemon's sampler sees usage only every tick, so a
single batch could overshoot the limit between two readings (or be OOM-killed). With an
address-space limit, an allocation that would cross the line fails in the allocator (torch:
``RuntimeError: can't allocate memory``, ONNX Runtime: ``Failed to allocate memory``,
NumPy: ``MemoryError``) and only that batch fails; the runner and the daemon live on.

``RLIMIT_AS`` counts virtual memory, and a runner forked from the preloaded forkserver starts
with about 1 GB of it (torch, ONNX Runtime and DeepSpeed libraries mapped, mostly shared and
never private). So the cap is set *after* load and warm-up, relative to that moment::

    RLIMIT_AS = VmSize_now + (limit - USS_now - malloc_free_now)

Every byte the runner can still add to its private memory (USS) or map from the pool needs
address space first, so ``USS + pool`` stays at or under ``limit`` (page copy-on-write of
pages shared with the forkserver is the only growth that needs no new address space: a few
MiB, measured in tests/memory). Untouched reservations (an arena's spare chunk, a new thread's
stack) make the cap bite a little early, never late. Loading itself is not under the cap:
admission checks the estimate first, and a model whose USS after warm-up is already past its
limit is refused with that number.

Why the runner's C allocator is tuned first (:func:`tune_allocator`, before the model loads):
the rule above holds only if growth needs new address space. glibc gives each thread that
allocates its own arena, a 64 MiB reservation counted in ``VmSize`` at once and filled later
without asking for more: with ONNX Runtime's worker threads a runner at a 60 MiB limit grew
from 10 to 150 MiB of USS with ``VmSize`` flat (measured, tests/memory). With one arena and a
fixed mmap threshold every large block is its own ``mmap`` (checked against the cap, given
back on ``free``) and the heap grows only through ``brk`` (also checked).

On CUDA the device side is capped by the backends (``torch.cuda.set_per_process_memory_fraction``,
ONNX Runtime's ``gpu_mem_limit``); ``RLIMIT_AS`` is not set there (the CUDA driver reserves
terabytes of address space).
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Any

from lastmile.runtime.memory import procfs
from lastmile.runtime.memory.units import MiB, human, mib


# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 * 1024  # blocks from here up are mmapped (and unmapped on free)
TRIM_THRESHOLD_BYTES = 1 * MiB  # free heap top past this goes back to the OS


def _mallopt() -> Any:
    try:
        fn = ctypes.CDLL("libc.so.6", use_errno=True).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    return fn


def single_arena() -> bool:
    """``M_ARENA_MAX = 1`` in this process (the forkserver, before its preload: see
    :mod:`lastmile.runtime.forkserver_prep`)."""
    fn = _mallopt()
    return bool(fn and fn(M_ARENA_MAX, 1) == 1)


def tune_allocator(limited: bool = True) -> dict[str, Any]:
    """Make every large allocation of this process visible to ``RLIMIT_AS`` (see the module
    docstring): one malloc arena, a fixed mmap threshold (no dynamic raise that would send
    big blocks into a reserved heap), a low trim threshold. Call it in the runner before the
    backend starts threads. ``limited=False`` (a model without a limit) gives glibc's default
    arena count back instead. Returns what was set (``{}`` where glibc is not there)."""
    mallopt = _mallopt()
    if mallopt is None:
        return {}
    done: dict[str, Any] = {}
    if not limited:
        mallopt(M_ARENA_MAX, 8 * (os.cpu_count() or 1))  # glibc's default on 64-bit
        return done
    for name, param, value in (("arena_max", M_ARENA_MAX, 1), ("mmap_threshold", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                               ("trim_threshold", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        if mallopt(param, value) == 1:
            done[name] = value
    _TUNED.update(done)
    return done


_TUNED: dict[str, Any] = {}  # what tune_allocator set in this process (shown with the cap)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_free_bytes() -> int:
    """Bytes glibc's malloc holds free in its heaps (``mallinfo2().fordblks``, all arenas):
    address space already counted that an allocation can reuse without asking the kernel.
    In a forked runner much of it is the forkserver's free space, shared until written: each
    reuse turns a shared page into a private one with no new address space (measured: 30 MiB
    of such growth for demo-lm). 0 when unknown (not glibc >= 2.33)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0
    fn.restype = _MallInfo2
    return int(fn().fordblks)


class OverLimit(RuntimeError):
    """The model already uses more than its limit after warm-up."""


def _proc_self() -> tuple[int, int]:
    """(VmSize, USS) of this process, through the room's one /proc reader."""
    return procfs.status()["vm"], procfs.rollup()["uss"]


def _set_rlimit_as(cap: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and cap > hard:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


class HardCap:
    """The runner's cap state: created by the runner (:mod:`lastmile.runtime.runner_main`)
    right after warm-up, redrawn by it when serving starts and on every shrink, and shown in
    the runner's ``info()["hard_cap"]``. The backend knows nothing of it."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    @classmethod
    def after_warmup(cls, limit_mb: int | None, device_kind: str = "cpu") -> "HardCap":
        """Set ``RLIMIT_AS`` for this process from ``limit_mb`` (see the module docstring).
        A model already over its limit gets ``state["error"]`` (the manager refuses the load
        with 507 and that number); no limit: an empty state."""
        try:
            return cls(cls._apply(limit_mb, device_kind))
        except OverLimit as exc:
            return cls({"kind": "none", "error": str(exc), "uss_at_cap_bytes": exc.args[1] if len(exc.args) > 1 else None})
        except (OSError, ValueError) as exc:  # no /proc, or a hard limit we may not raise
            return cls({"kind": "none", "note": f"no address-space cap: {exc}"} if limit_mb else {})

    @staticmethod
    def _apply(limit_mb: int | None, device_kind: str) -> dict[str, Any]:
        limit = mib(limit_mb)
        if limit is None:
            return {}
        if device_kind != "cpu":
            return {"kind": "device_allocator", "limit_bytes": limit,
                    "note": "device memory capped by the backend (set_per_process_memory_fraction / gpu_mem_limit)"}
        vm, uss = _proc_self()
        if uss >= limit:
            raise OverLimit(
                f"after load and warm-up the model uses {human(uss)} of private memory, more than its "
                f"memory_limit_mb ({limit_mb} MiB); raise memory_limit_mb or lower max_batch_size/dtype", uss)
        slack = malloc_free_bytes()
        cap = _set_rlimit_as(vm + max(0, limit - uss - slack))
        return {"kind": "rlimit_as", "limit_bytes": limit, "rlimit_as_bytes": cap, "vm_at_cap_bytes": vm,
                "uss_at_cap_bytes": uss, "malloc_free_bytes": slack, "headroom_bytes": max(0, limit - uss - slack),
                "allocator": dict(_TUNED)}

    def recap(self) -> dict[str, Any] | None:
        """Draw the line again from the present (same rule), never above the present size
        when already over the limit. The rule holds only while address space that is counted
        but not private (reserved, shared) stays: the runner calls this when it starts
        serving (reservations released after warm-up would otherwise loosen the cap: 35-52 MiB
        measured for ONNX Runtime) and on every shrink *before* ``malloc_trim`` (whose holes
        are refilled without new address space). None when there is no ``RLIMIT_AS`` cap."""
        cap = self.state
        if cap.get("kind") != "rlimit_as":
            return None
        try:
            vm, uss = _proc_self()
            slack = malloc_free_bytes()
            new = _set_rlimit_as(vm + max(0, int(cap["limit_bytes"]) - uss - slack))
        except (OSError, ValueError):
            return cap
        cap.update(rlimit_as_bytes=new, vm_at_cap_bytes=vm, uss_at_cap_bytes=uss, malloc_free_bytes=slack,
                   recaps=int(cap.get("recaps", 0)) + 1)
        return cap

    def as_dict(self) -> dict[str, Any]:
        return dict(self.state)
