"""The memory limit of the control group the daemon runs in (systemd's ``MemoryMax=``, a
container's ``--memory``), which is the real ceiling when it is below the host's RAM.

Two details decide whether a budget derived from it is right:

- **Page cache is not used memory.** A cgroup's usage (``memory.current``) counts the file
  pages its processes read (model weights loaded from disk: hundreds of MB), which the kernel
  reclaims before it OOM-kills anything. Counting them as used makes a box whose models were
  just read from disk look full. The reclaimable part is taken as the inactive file pages
  (what container runtimes call usage minus the working set).
- **The tightest limit on the path wins.** A unit in a slice with ``MemoryMax=`` on the slice is
  bound by the slice; cgroup v2 is walked from the process's group up to the root, cgroup v1
  reports the effective figure as ``hierarchical_memory_limit``.

No limit (the root group, ``max``, v1's "unlimited" page-counter maximum) reads as None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 writes "no limit" as the page counter's maximum rounded to pages (~2^63)
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    limit: int  # bytes the group may use
    usage: int  # what the kernel charges it now, page cache included
    reclaimable: int  # inactive file pages: reclaimed before the group runs out
    path: str  # the directory the limit was read from

    @property
    def available(self) -> int:
        """What the group can still take: its limit minus the usage that is not reclaimable."""
        return max(0, self.limit - (self.usage - self.reclaimable))

    def as_dict(self) -> dict[str, int | str]:
        return {"limit_bytes": self.limit, "usage_bytes": self.usage, "reclaimable_bytes": self.reclaimable,
                "available_bytes": self.available, "path": self.path}


def _int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" and unreadable files alike: no figure


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def _group_dir(root: Path, group: str) -> Path:
    """The group's directory; inside a cgroup namespace (a container) ``/proc/self/cgroup``
    may name a path that is not mounted, and the mount point itself is the group."""
    candidate = root / group.lstrip("/")
    return candidate if candidate.is_dir() else root


def _v2(root: Path, group: str) -> CgroupMemory | None:
    best: tuple[int, Path] | None = None
    here = _group_dir(root, group)
    while True:
        limit = _int(here / "memory.max")
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, here)
        if here == root or root not in here.parents:
            break
        here = here.parent
    if best is None:
        return None
    limit, where = best
    stat = _stat(where / "memory.stat")
    return CgroupMemory(limit, _int(where / "memory.current") or 0, stat.get("inactive_file", 0), str(where))


def _v1(root: Path, group: str) -> CgroupMemory | None:
    here = _group_dir(root / "memory", group)
    stat = _stat(here / "memory.stat")
    limit = stat.get("hierarchical_memory_limit", _int(here / "memory.limit_in_bytes"))
    if limit is None or limit >= _V1_UNLIMITED:
        return None
    return CgroupMemory(limit, _int(here / "memory.usage_in_bytes") or 0, stat.get("total_inactive_file", 0), str(here))


def read(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> CgroupMemory | None:
    """This process's cgroup memory limit and usage, or None when no limit applies (or no
    cgroup file system is mounted). v2 (one unified hierarchy, ``0::/path``) first, then v1's
    memory controller (``N:memory:/path``)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    groups: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups[parts[1]] = parts[2]
    v1_memory = next((path for controllers, path in groups.items() if "memory" in controllers.split(",")), None)
    if v1_memory is not None:
        return _v1(root, v1_memory)
    if "" in groups and (root / "cgroup.controllers").is_file():
        return _v2(root, groups[""])
    return None
