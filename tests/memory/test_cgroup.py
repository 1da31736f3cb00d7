"""The cgroup memory reader on cgroup file trees laid out as the kernel lays them out (v2 with a
limit on the slice above the unit, v1's hierarchical figure, containers' namespaced paths), and
on this machine's real /proc and /sys. A limit turns into the host budget and into the room the
governor admits against, with reclaimable page cache counted as available."""

from __future__ import annotations

from pathlib import Path

from lastmile.runtime.memory import cgroup
from lastmile.runtime.memory.budget import Budgets
from lastmile.runtime.memory.policy import DEFAULTS

MiB = 1 << 20


def _files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _v2_tree(tmp_path: Path, slice_max: str, unit_max: str) -> tuple[Path, Path]:
    root = tmp_path / "sys"
    unit = "system.slice/edge.slice/lastmile.service"
    _files(root, {
        "cgroup.controllers": "cpu memory pids\n",
        "system.slice/memory.max": "max\n",
        "system.slice/edge.slice/memory.max": slice_max,
        "system.slice/edge.slice/memory.current": str(900 * MiB),
        "system.slice/edge.slice/memory.stat": f"anon {500 * MiB}\nfile {400 * MiB}\ninactive_file {300 * MiB}\n",
        f"{unit}/memory.max": unit_max,
        f"{unit}/memory.current": str(400 * MiB),
        f"{unit}/memory.stat": f"anon {450 * MiB}\ninactive_file {250 * MiB}\n",
    })
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::/{unit}\n")
    return proc, root


def test_v2_the_tightest_limit_on_the_path_wins_and_page_cache_is_available(tmp_path: Path) -> None:
    proc, root = _v2_tree(tmp_path, slice_max=f"{1024 * MiB}\n", unit_max="max\n")
    group = cgroup.read(proc, root)
    assert group is not None and group.limit == 1024 * MiB and group.path.endswith("edge.slice")
    assert group.usage == 900 * MiB and group.reclaimable == 300 * MiB
    assert group.available == (1024 - 900 + 300) * MiB  # page cache is not used memory

    proc, root = _v2_tree(tmp_path / "b", slice_max=f"{1024 * MiB}\n", unit_max=f"{512 * MiB}\n")
    group = cgroup.read(proc, root)
    assert group is not None and group.limit == 512 * MiB and group.path.endswith("lastmile.service")
    assert group.available == (512 - 400 + 250) * MiB


def test_no_limit_anywhere_is_none(tmp_path: Path) -> None:
    proc, root = _v2_tree(tmp_path, slice_max="max\n", unit_max="max\n")
    assert cgroup.read(proc, root) is None
    assert cgroup.read(tmp_path / "missing", root) is None


def test_v1_hierarchical_limit_and_a_container_namespace(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    _files(root, {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/memory.usage_in_bytes": str(700 * MiB),
        "memory/memory.stat": f"cache {400 * MiB}\nhierarchical_memory_limit {2048 * MiB}\ntotal_inactive_file {350 * MiB}\n",
    })
    proc = tmp_path / "cgroup"
    # the container sees its own group at the mount point; /proc names a path that is not mounted
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n")
    group = cgroup.read(proc, root)
    assert group is not None and group.limit == 2048 * MiB and group.usage == 700 * MiB
    assert group.available == (2048 - 700 + 350) * MiB
    (root / "memory/memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert cgroup.read(proc, root) is None  # v1's "unlimited"


def test_this_machine_reads_consistently() -> None:
    group = cgroup.read()
    if group is not None:  # under a limit: the figures are the kernel's, and coherent
        assert 0 < group.limit and 0 <= group.reclaimable <= group.usage + group.reclaimable
        assert group.available <= group.limit + group.reclaimable


def test_a_cgroup_limit_below_ram_is_the_host_budget(tmp_path: Path, monkeypatch) -> None:
    proc, root = _v2_tree(tmp_path, slice_max=f"{1024 * MiB}\n", unit_max="max\n")
    real_read = cgroup.read
    monkeypatch.setattr(cgroup, "read", lambda: real_read(proc, root))  # the daemon's own group, laid out above
    budgets = Budgets(dict(DEFAULTS), accelerators={})
    host = budgets.budget("host")
    assert host["total_bytes"] == 1024 * MiB
    assert host["limit_bytes"] == int(1024 * MiB * DEFAULTS["host_limit_fraction"])
    assert budgets.host_available() <= (1024 - 900 + 300) * MiB
