"""The shared-memory buffer pool: real tmpfs segments in /dev/shm, counted on disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from lastmile.runtime.errors import ShmError
from lastmile.runtime.shm import (
    ALIGN,
    BufferPool,
    SegmentCache,
    cleanup_stale,
    count_segments,
    layout_of,
    pack,
    size_class,
    views,
)

SHM = Path("/dev/shm")


@pytest.fixture
def pool():
    p = BufferPool(f"lastmile-{os.getpid()}-test{time.monotonic_ns()}-", max_idle_bytes=64 << 20)
    yield p
    p.close()


def on_disk(p: BufferPool) -> int:
    return count_segments(p.prefix)


def test_size_classes_are_powers_of_two_from_one_page():
    assert size_class(0) == 4096
    assert size_class(1) == 4096
    assert size_class(4096) == 4096
    assert size_class(4097) == 8192
    assert size_class((1 << 20) + 1) == 2 << 20
    with pytest.raises(ValueError, match="nbytes"):
        size_class(-1)


def test_pack_and_view_round_trip_without_copy(pool):
    arrays = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "i64": np.arange(3, dtype=np.int64)[::-1],  # non-contiguous source
        "bool": np.array([[True], [False], [True]]),
        "f16": np.ones((3, 2, 2), dtype=np.float16),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }
    layout, total = layout_of(arrays)
    assert all(offset % ALIGN == 0 for _, _, _, offset in layout)
    buf = pool.acquire(total)
    assert buf.size >= total
    pack(arrays, buf.mm, layout)
    back = views(buf.mm, layout)
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name], arr)
    # A second mapping of the same segment (what a runner child does) sees writes: no copy.
    cache = SegmentCache()
    other = views(cache.get(buf.name), layout, readonly=True)
    back["f32"][0, 0] = 42.0
    assert other["f32"][0, 0] == 42.0
    assert not other["f32"].flags.writeable
    del other, back
    cache.drop(None)
    assert len(cache) == 0
    pool.release(buf)


def test_pack_refuses_what_cannot_cross(pool):
    buf = pool.acquire(10)
    with pytest.raises(ShmError, match="obj: dtype object"):
        layout_of({"obj": np.array([object()])})
    with pytest.raises(ShmError, match="need 8000 bytes but the buffer holds 4096"):
        pack({"big": np.zeros(1000, dtype=np.float64)}, buf.mm)
    pool.release(buf)


def test_steady_state_reuses_segments(pool):
    sizes = [100, 3000, 5000, 70_000, 100, 70_000]
    for _ in range(3):  # warm-up: every size class gets a segment
        held = [pool.acquire(n) for n in sizes]
        for b in held:
            pool.release(b)
    warm = pool.stats()
    for _ in range(50):
        held = [pool.acquire(n) for n in sizes]
        for b in held:
            pool.release(b)
    after = pool.stats()
    assert after["misses"] == warm["misses"], "steady state created new segments"
    steady_hits = after["hits"] - warm["hits"]
    assert steady_hits == 50 * len(sizes)  # hit rate of the steady phase: 1.0
    assert after["segments"] == warm["segments"] == on_disk(pool)
    assert after["bytes_in_use"] == 0
    assert after["bytes_idle"] == sum(b for b in (4096, 4096, 8192, 131072, 4096, 131072))
    assert 0.9 < after["hit_rate"] <= 1.0


def test_shrink_unlinks_idle_and_tells_runners(pool):
    kept = pool.acquire(10)
    idle = [pool.acquire(n) for n in (10, 9000, 200_000)]
    for b in idle:
        pool.release(b)
    epoch = pool.epoch
    assert on_disk(pool) == 4
    freed = pool.shrink()
    assert freed == 4096 + 16384 + 262144
    assert on_disk(pool) == 1  # the buffer still lent out survives
    names, new_epoch = pool.unlinked_since(epoch)
    assert sorted(names) == sorted(b.name for b in idle)
    assert pool.unlinked_since(new_epoch) == ((), new_epoch)
    assert pool.stats()["bytes_idle"] == 0
    pool.release(kept)
    assert pool.shrink(keep_bytes=4096) == 0  # keeps up to 4096 idle
    assert pool.stats()["segments"] == 1


def test_idle_cap_unlinks_instead_of_keeping():
    p = BufferPool(f"lastmile-{os.getpid()}-cap{time.monotonic_ns()}-", max_idle_bytes=8192)
    try:
        a, b, c = p.acquire(4096), p.acquire(4096), p.acquire(4096)
        for x in (a, b, c):
            p.release(x)
        s = p.stats()
        assert s["bytes_idle"] == 8192 and s["segments"] == 2 == on_disk(p)
    finally:
        p.close()


def test_refcount_keeps_buffer_until_last_release(pool):
    buf = pool.acquire(10)
    pool.retain(buf)
    pool.release(buf)
    assert pool.stats()["bytes_in_use"] == 4096
    pool.release(buf)
    assert pool.stats()["bytes_in_use"] == 0
    with pytest.raises(ShmError, match="released twice"):
        pool.release(buf)


def test_close_unlinks_everything_even_lent_buffers():
    p = BufferPool(f"lastmile-{os.getpid()}-close{time.monotonic_ns()}-")
    lent = p.acquire(5000)
    view = np.ndarray((10,), dtype=np.float32, buffer=lent.mm)  # a view alive at close
    p.release(p.acquire(100))
    assert on_disk(p) == 2
    p.close()
    assert on_disk(p) == 0
    assert view.shape == (10,)  # still readable: the mapping lives until the view dies
    with pytest.raises(ShmError, match="closed"):
        p.acquire(10)
    p.release(lent)  # releasing after close is harmless
    p.close()  # idempotent


def test_prefix_is_sanitised_for_file_names():
    p = BufferPool(f"lastmile-{os.getpid()}-my/model name-")
    try:
        buf = p.acquire(1)
        assert "/" not in buf.name and " " not in buf.name
        assert (SHM / buf.name).exists()
        p.release(buf)
    finally:
        p.close()


def test_cleanup_stale_removes_segments_of_dead_daemons_only(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
    mine = tmp_path / f"lastmile-{os.getpid()}-m-p1-0"
    stale_dead = tmp_path / f"lastmile-{dead_pid}-m-p1-0"
    stale_recycled = tmp_path / f"lastmile-{os.getpid()}-old-p1-0"  # our pid, from before we started
    other = tmp_path / "someone-else"
    for f in (mine, stale_dead, stale_recycled, other):
        f.write_bytes(b"x")
    long_ago = time.time() - 10 * 365 * 86400
    os.utime(stale_recycled, (long_ago, long_ago))
    removed = cleanup_stale(shm_dir=tmp_path)
    assert sorted(removed) == sorted([stale_dead.name, stale_recycled.name])
    assert mine.exists() and other.exists()
    assert not stale_dead.exists() and not stale_recycled.exists()


def test_segment_cache_reports_missing_segment():
    with pytest.raises(ShmError, match="does not exist"):
        SegmentCache().get(f"lastmile-{os.getpid()}-nope")
    with pytest.raises(ShmError, match="bad segment name"):
        SegmentCache().get("../etc/passwd")
