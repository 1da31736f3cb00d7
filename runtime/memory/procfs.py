"""The one reader of ``/proc`` memory figures for the whole room (sampler, cap, tools, tests).

Which figure means what, and which one each user takes:

- ``uss``: Private_Clean + Private_Dirty of ``smaps_rollup``: pages only this process maps.
  What unloading a runner gives back, and what the runner's hard cap (``RLIMIT_AS``, see
  :mod:`lastmile.runtime.memory.cap`) holds under its limit: the ladder and the API's
  ``used_bytes`` use it (plus the model's pool segments).
- ``anonymous``: anonymous pages mapped, private or shared copy-on-write. For lastmile's own
  processes (daemon, forkserver): a page the forkserver shares with its runners stays counted
  once, here, however many runners share it, so "own" memory does not swing with the number
  of models (USS would: a fork turns the forkserver's private pages into shared ones).
- ``pss``: proportional share; adds up across processes. Measuring tools only.
- ``rss``/``vm``/``hwm``: ``/proc/<pid>/status``, cheap (no page-table walk): the sampler's
  change detector and the cap's address-space arithmetic.

``smaps_rollup`` makes the kernel walk the page tables: 10-30 ms for a torch process, which is
why the sampler reads it only when ``status`` says something moved.
"""

from __future__ import annotations

import os
import threading

_STATUS_KEYS = {b"VmRSS": "rss", b"VmSize": "vm", b"VmHWM": "hwm"}
_ROLLUP_KEYS = {b"Rss": "rollup_rss", b"Pss": "pss", b"Private_Clean": "private_clean", b"Private_Dirty": "private_dirty",
                b"Anonymous": "anonymous", b"Swap": "swap"}


def status(pid: int | str = "self") -> dict[str, int]:
    """``rss``, ``vm``, ``hwm`` (bytes) from ``/proc/<pid>/status``. OSError when gone."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            key = line.split(b":", 1)[0]
            if key in _STATUS_KEYS:
                out[_STATUS_KEYS[key]] = int(line.split()[1]) * 1024
    return out


def rollup(pid: int | str = "self") -> dict[str, int]:
    """``uss``, ``pss``, ``anonymous``, ``swap`` (bytes) from ``/proc/<pid>/smaps_rollup``.
    OSError when gone."""
    out = dict.fromkeys(_ROLLUP_KEYS.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            key = line.split(b":", 1)[0]
            if key in _ROLLUP_KEYS:
                out[_ROLLUP_KEYS[key]] = int(line.split()[1]) * 1024
    out["uss"] = out.pop("private_clean") + out.pop("private_dirty")
    return out


def read_proc_memory(pid: int | str, full: bool = True) -> dict[str, int]:
    """:func:`status`, plus :func:`rollup` when ``full``. OSError when the process is gone."""
    out = status(pid)
    if full:
        out.update(rollup(pid))
    return out


def meminfo() -> dict[str, int]:
    """``total`` and ``available`` bytes of the host from ``/proc/meminfo``."""
    keys = {b"MemTotal": "total", b"MemAvailable": "available"}
    out: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key = line.split(b":", 1)[0]
            if key in keys:
                out[keys[key]] = int(line.split()[1]) * 1024
    return out


def pss(pids: list[int]) -> int:
    """PSS summed over ``pids`` (gone ones count 0): unlike USS it adds up across fork
    sharing (a fork turns the forkserver's private pages into shared ones)."""
    total = 0
    for pid in pids:
        try:
            total += rollup(pid)["pss"]
        except OSError:
            pass
    return total


def children(pid: int | str = "self") -> list[int]:
    """Direct children of ``pid`` from ``/proc/<pid>/task/*/children`` (no walk of every
    process, unlike psutil's ``children()``). OSError when the kernel lacks the file."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
            out.extend(int(x) for x in f.read().split())
    return out


def forkserver_pids(parent: int | None = None) -> list[int]:
    """The multiprocessing forkserver(s) among the children of ``parent`` (default: this process)."""
    import psutil

    return [c.pid for c in psutil.Process(parent).children() if "forkserver" in " ".join(c.cmdline())]


def footprint(pid: int, pool_prefix: str, shm_dir: str = "/dev/shm") -> dict[str, int]:
    """What one model really occupies, each page counted once (tests and
    ``python -m lastmile.runtime.memory.measure``; too slow for the sampler: it reads the
    runner's whole ``/proc/<pid>/smaps``, 20-40 ms):

    - ``private_bytes``: the runner's private pages outside shared-memory segments
      (Private_Clean + Private_Dirty of every other mapping: heap, arenas, copied pages);
    - ``pool_bytes``: the model's pool segments: files in ``shm_dir`` named ``pool_prefix*``
      (allocated bytes, mapped or not, idle or lent) plus segments already unlinked that the
      runner still maps (their pages live until it drops the mapping);
    - ``total_bytes``: the sum, the figure held against ``memory_limit_mb``.

    USS + ``RssShmem`` (what a quick look gives) counts a pool page twice when only the runner
    maps it, and misses segments the runner has not mapped. Raises OSError when the process
    is gone."""
    private = 0
    stale: dict[str, int] = {}
    in_pool = False
    name = ""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(b":"):  # a mapping's header: range perms offset dev inode [path]
                parts = line.split(None, 5)
                path = parts[5].strip().decode(errors="replace") if len(parts) > 5 else ""
                in_pool = path.startswith(f"{shm_dir}/") and "/lastmile-" in path
                name = path
                continue
            if in_pool:
                if head == b"Size:" and name.endswith(" (deleted)"):
                    stale[name] = max(stale.get(name, 0), int(line.split()[1]) * 1024)
            elif head in (b"Private_Clean:", b"Private_Dirty:"):
                private += int(line.split()[1]) * 1024
    pool = 0
    base = os.path.basename(pool_prefix)
    try:
        with os.scandir(shm_dir) as entries:
            for entry in entries:
                if entry.name.startswith(base):
                    try:
                        pool += entry.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    pool += sum(size for name, size in stale.items() if os.path.basename(name).startswith(base))
    return {"private_bytes": private, "pool_bytes": pool, "total_bytes": private + pool}


class FootprintWatch:
    """Samples :func:`footprint` of a runner from a thread (tests and measuring tools): its
    private memory outside shared memory + the model's pool segments, each page once; keeps
    the peak."""

    def __init__(self, pid: int, prefix: str, interval_s: float = 0.02) -> None:
        self.pid, self.prefix, self.interval_s = pid, prefix, interval_s
        self.peak: dict[str, int] = {"total_bytes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = footprint(self.pid, self.prefix)
            except OSError:
                return
            self.samples += 1
            if now["total_bytes"] > self.peak["total_bytes"]:
                self.peak = now
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "FootprintWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
