"""The dynamic batcher, driven by a real ``run_batch`` that computes a row-dependent result
(so a row handed to the wrong caller, or lost, shows up as a wrong number)."""

from __future__ import annotations

import asyncio
import os
import random
import time

import numpy as np
import pytest

from lastmile.runtime.batcher import Batcher
from lastmile.runtime.errors import BatchTooLarge, InvalidBatch, ModelUnavailable, QueueFull, RequestTimeout
from lastmile.runtime.shm import BufferPool, PackedArrays

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0


def expected(x: np.ndarray) -> np.ndarray:
    """Per-row function: depends on every value of the row and nothing else."""
    return x @ W + x.sum(axis=1, keepdims=True) ** 2


class Model:
    """A small but real model for the batcher: records every batch it sees; can be gated."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[np.ndarray] = []
        self.packed: list[bool] = []
        self.delay_s = delay_s
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.batches.append(np.array(x))
        self.packed.append(isinstance(inputs, PackedArrays))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return {"y": expected(x), "row_id": x[:, :1].astype(np.int64)}
        finally:
            self.in_flight -= 1


def request(rows: int, marker: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(marker).standard_normal((rows, 4)).astype(np.float32)
    x[:, 0] = marker  # the first column says whose row it is
    return {"x": x}


def make(model, **kw) -> Batcher:
    opts = dict(max_batch_size=8, max_delay_ms=5.0, max_queue=1000, timeout_s=10.0)
    opts.update(kw)
    return Batcher(model, **opts)


@pytest.mark.parametrize("use_pool", [False, True], ids=["heap", "shm-pool"])
async def test_concurrent_mixed_sizes_each_caller_gets_its_own_rows(use_pool):
    pool = BufferPool(f"lastmile-{os.getpid()}-batcher-") if use_pool else None
    model = Model(delay_s=0.002)
    b = make(model, max_batch_size=8, max_delay_ms=3.0, concurrency=2, pool=pool)
    rnd = random.Random(7)
    reqs = [request(rnd.randint(1, 5), marker=i + 1) for i in range(60)]

    async def one(i, inputs):
        await asyncio.sleep(rnd.random() * 0.02)
        return i, await b.submit(inputs)

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    for i, (out, info) in results:
        x = reqs[i]["x"]
        assert out["y"].shape == (x.shape[0], 3)
        np.testing.assert_allclose(out["y"], expected(x), rtol=1e-5)
        assert (out["row_id"][:, 0] == i + 1).all()
        assert info.batch_size <= 8 and info.queue_s >= 0 and info.compute_s > 0
    sizes = [len(x) for x in model.batches]
    assert max(sizes) <= 8
    assert sum(sizes) == sum(len(r["x"]) for r in reqs)  # every row ran exactly once
    assert len(model.batches) < len(reqs)  # requests were really batched together
    assert model.max_in_flight <= 4  # two runners, each with at most one full batch sent ahead
    s = b.stats()
    assert s["requests"] == 60 and s["queue_depth"] == 0 and s["in_flight"] == 0
    assert s["avg_batch_size"] == pytest.approx(sum(sizes) / len(sizes))
    if pool is not None:
        assert all(model.packed)  # concatenated straight into shared memory
        assert pool.stats()["bytes_in_use"] == 0
        pool.close()


async def test_a_full_batch_goes_ahead_of_a_busy_runner_a_partial_one_waits():
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=2, max_delay_ms=0.0, concurrency=1)
    first = asyncio.ensure_future(b.submit(request(1, 1)))
    await asyncio.sleep(0.01)
    assert model.in_flight == 1
    partial = asyncio.ensure_future(b.submit(request(1, 2)))
    await asyncio.sleep(0.01)
    assert model.in_flight == 1 and b.stats()["queue_depth"] == 1  # collects rows meanwhile
    completes = asyncio.ensure_future(b.submit(request(1, 3)))
    await asyncio.sleep(0.01)
    assert model.in_flight == 2  # now full: sent ahead while the first still runs
    later = asyncio.ensure_future(b.submit(request(2, 4)))
    await asyncio.sleep(0.01)
    assert model.in_flight == 2 and b.stats()["queue_depth"] == 1  # one ahead per runner, no more
    model.gate.set()
    for t, marker in ((first, 1), (partial, 2), (completes, 3), (later, 4)):
        out, _ = await t
        assert (out["row_id"] == marker).all()
    assert [sorted({int(v) for v in x[:, 0]}) for x in model.batches] == [[1], [2, 3], [4]]
    assert model.max_in_flight == 2 and b.stats()["in_flight"] == 0


async def test_no_batch_goes_ahead_when_the_pool_could_not_lend_it_too():
    pool = BufferPool(f"lastmile-{os.getpid()}-ahead-")
    probe = pool.acquire(2 * 4 * 4)  # what one 2-row batch of 4 float32 takes
    pool.max_bytes = probe.size * 3 // 2
    pool.release(probe)
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=2, max_delay_ms=0.0, concurrency=1, pool=pool)
    tasks = [asyncio.ensure_future(b.submit(request(2, i + 1))) for i in range(3)]
    await asyncio.sleep(0.02)
    assert model.in_flight == 1 and b.stats()["queue_depth"] == 2
    model.gate.set()
    for i, t in enumerate(tasks):
        out, _ = await t
        assert (out["row_id"] == i + 1).all()
    assert model.max_in_flight == 1 and pool.stats()["bytes_in_use"] == 0
    pool.close()


async def test_different_trailing_shapes_batch_separately_and_neither_starves():
    seen: list[tuple[int, int]] = []

    async def lm(inputs):
        ids = inputs["ids"]
        seen.append(ids.shape)
        await asyncio.sleep(0.003)
        return {"logits": ids.astype(np.float32) * 2}

    b = Batcher(lm, max_batch_size=4, max_delay_ms=1.0, max_queue=1000, timeout_s=10.0)

    async def stream(seq, n):
        out = []
        for i in range(n):
            ids = np.full((1, seq), i, dtype=np.int64)
            res, _ = await b.submit({"ids": ids})
            np.testing.assert_array_equal(res["logits"], ids * 2)
            out.append(time.perf_counter())
        return out

    # A busy stream of length-8 requests (8 concurrent clients) and one lone length-16 client.
    busy = [asyncio.ensure_future(stream(8, 15)) for _ in range(8)]
    started = time.perf_counter()
    lone = await stream(16, 3)
    assert lone[-1] - started < 0.5, "the rare signature starved behind the busy one"
    await asyncio.gather(*busy)
    assert all(len(set(shape[1:] for shape in [s])) == 1 for s in seen)
    assert {s[1] for s in seen} == {8, 16}
    assert any(s[0] > 1 for s in seen if s[1] == 8)


async def test_a_lone_request_is_not_held_back_by_max_delay():
    model = Model()
    b = make(model, max_batch_size=8, max_delay_ms=200.0)
    for i in range(3):  # a closed-loop client: each request finds the runner free
        t0 = time.perf_counter()
        out, info = await b.submit(request(1, i + 1))
        assert time.perf_counter() - t0 < 0.1, "a lone request waited for company that was not coming"
        assert info.batch_size == 1 and info.queue_s < 0.05
        assert (out["row_id"] == i + 1).all()
    # A full batch does not wait either.
    t0 = time.perf_counter()
    res = await asyncio.gather(*(b.submit(request(8, i)) for i in range(4)))
    assert time.perf_counter() - t0 < 0.1
    assert {info.batch_size for _, info in res} == {8}


async def test_rows_accumulate_while_the_runner_is_busy_and_returning_clients_are_awaited():
    model = Model(delay_s=0.01)
    b = make(model, max_batch_size=8, max_delay_ms=100.0)

    async def client(marker: int, n: int) -> None:
        for _ in range(n):
            out, _ = await b.submit(request(1, marker))
            assert (out["row_id"] == marker).all()

    await asyncio.gather(*(client(i + 1, 6) for i in range(8)))
    sizes = [len(x) for x in model.batches]
    # The first request runs alone; the other seven gather behind it and, once it is answered,
    # wait (up to max_delay_ms) for its client to come back instead of splitting in two cohorts.
    assert sizes[0] == 1 and sizes.count(8) >= 5, sizes
    assert sum(sizes) == 48


async def test_max_delay_is_a_ceiling_on_waiting_for_returning_clients():
    model = Model(delay_s=0.01)
    b = make(model, max_batch_size=8, max_delay_ms=30.0)
    first = asyncio.ensure_future(b.submit(request(1, 1)))
    await asyncio.sleep(0.001)
    second = asyncio.ensure_future(b.submit(request(1, 2)))  # queued behind the busy runner
    await first  # answered: its client "might come back", but never does
    t0 = time.perf_counter()
    _, info = await second
    waited = time.perf_counter() - t0
    assert 0.02 <= waited < 0.2, waited
    assert info.batch_size == 1
    b.configure(max_delay_ms=0)  # 0: never wait for anyone
    first = asyncio.ensure_future(b.submit(request(1, 3)))
    await asyncio.sleep(0.001)
    second = asyncio.ensure_future(b.submit(request(1, 4)))
    await first
    t0 = time.perf_counter()
    await second
    assert time.perf_counter() - t0 < 0.02 + 0.05


async def test_queue_full_with_retry_after():
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=8, max_delay_ms=0.0, max_queue=3)
    running = asyncio.ensure_future(b.submit(request(2, 1)))  # goes to the runner, blocks there
    # the queued 6 rows are no full batch, so none goes ahead of the busy runner
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(b.submit(request(2, i))) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert b.stats()["queue_depth"] == 3 and b.stats()["in_flight"] == 1
    with pytest.raises(QueueFull) as err:
        await b.submit(request(1, 5))
    assert err.value.retry_after_s > 0
    assert "3 requests waiting (max_queue 3)" in str(err.value)
    assert b.stats()["rejected"] == 1
    model.gate.set()
    await asyncio.gather(running, *queued)
    # Once a batch time is known, the estimate scales with the queued work.
    assert b.retry_after_s() > 0


async def test_batch_too_large_names_both_numbers():
    b = make(Model(), max_batch_size=4)
    with pytest.raises(BatchTooLarge, match=r"request has 5 rows .* max_batch_size is 4"):
        await b.submit(request(5, 1))


async def test_bad_inputs_name_the_tensor():
    b = make(Model())
    with pytest.raises(InvalidBatch, match="'x' has 2"):
        await b.submit({"x": np.zeros((2, 4), np.float32), "y": np.zeros((3, 4), np.float32)})
    with pytest.raises(InvalidBatch, match="s: a scalar"):
        await b.submit({"s": np.zeros((), np.float32)})
    with pytest.raises(InvalidBatch, match="at least one input"):
        await b.submit({})


async def test_timeout_while_queued_and_while_running():
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=4, max_delay_ms=0.0, timeout_s=0.1)  # 2 queued rows: not full
    t0 = time.perf_counter()
    running = asyncio.ensure_future(b.submit(request(2, 1)))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(b.submit(request(2, 2)))
    with pytest.raises(RequestTimeout, match=r"0.1 s \(running\)"):
        await running
    with pytest.raises(RequestTimeout, match=r"\(queued\)"):
        await queued
    assert time.perf_counter() - t0 < 0.3
    model.gate.set()
    await asyncio.sleep(0.02)
    # The queued request's rows never reached the model.
    assert [int(x[0, 0]) for x in model.batches] == [1]
    assert b.stats()["timeouts"] == 2 and b.stats()["queue_depth"] == 0


async def test_cancelled_request_rows_never_reach_the_runner():
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=8, max_delay_ms=0.0)
    first = asyncio.ensure_future(b.submit(request(1, 1)))  # occupies the only slot
    await asyncio.sleep(0.01)
    a = asyncio.ensure_future(b.submit(request(2, 2)))
    c = asyncio.ensure_future(b.submit(request(3, 3)))
    await asyncio.sleep(0.01)
    a.cancel()
    await asyncio.sleep(0)
    assert b.stats()["queue_depth"] == 1
    model.gate.set()
    out, info = await c
    await first
    assert a.cancelled()
    markers = sorted({int(v) for x in model.batches for v in x[:, 0]})
    assert markers == [1, 3]
    assert info.batch_size == 3
    assert (out["row_id"] == 3).all()


async def test_cancel_while_running_drops_result_and_keeps_serving():
    model = Model(delay_s=0.05)
    b = make(model, max_delay_ms=0.0)
    t = asyncio.ensure_future(b.submit(request(2, 1)))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    out, _ = await b.submit(request(1, 2))
    assert (out["row_id"] == 2).all()


async def test_configure_live():
    model = Model(delay_s=0.005)
    b = make(model, max_batch_size=8, max_delay_ms=5.0)
    await asyncio.gather(*(b.submit(request(1, i)) for i in range(16)))
    assert max(len(x) for x in model.batches) == 8
    model.batches.clear()
    b.configure(max_batch_size=2, concurrency=3)
    await asyncio.gather(*(b.submit(request(1, i)) for i in range(12)))
    assert max(len(x) for x in model.batches) == 2
    assert model.max_in_flight == 6  # three runners, and a full batch sent ahead of each
    assert b.stats()["max_batch_size"] == 2
    with pytest.raises(ValueError, match="max_batch_size: got 0"):
        b.configure(max_batch_size=0)
    with pytest.raises(ValueError, match="bogus: not a batcher setting"):
        b.configure(bogus=1)
    # Lowering max_batch_size below a queued request fails that request, not the others.
    model.gate = asyncio.Event()
    b.configure(max_batch_size=8, concurrency=1, max_delay_ms=0)  # 5 queued rows: not full
    blocker = asyncio.ensure_future(b.submit(request(1, 1)))
    await asyncio.sleep(0.01)
    big = asyncio.ensure_future(b.submit(request(4, 2)))
    small = asyncio.ensure_future(b.submit(request(1, 3)))
    await asyncio.sleep(0)
    b.configure(max_batch_size=2)
    model.gate.set()
    with pytest.raises(BatchTooLarge, match="4 rows"):
        await big
    await asyncio.gather(blocker, small)


async def test_run_batch_error_reaches_every_request_and_batcher_continues():
    calls = 0

    gate = asyncio.Event()

    async def flaky(inputs):
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()  # the runner is busy: the next three queue up as one batch
        if calls == 2:
            raise RuntimeError("boom in the backend")
        return {"y": inputs["x"] * 2}

    b = make(flaky, max_delay_ms=0.0)
    blocker = asyncio.ensure_future(b.submit(request(1, 9)))
    await asyncio.sleep(0.01)
    batch = asyncio.gather(*(b.submit(request(1, i)) for i in range(3)), return_exceptions=True)
    await asyncio.sleep(0.01)
    gate.set()
    await blocker
    res = await batch
    assert all(isinstance(r, RuntimeError) and "boom" in str(r) for r in res)
    out, _ = await b.submit(request(1, 7))
    assert (out["y"][:, 0] == 14).all()
    assert b.stats()["errors"] == 1


async def test_outputs_without_batch_dim_are_an_error():
    async def bad(inputs):
        return {"y": np.zeros(3)}

    b = make(bad, max_delay_ms=0)
    with pytest.raises(Exception, match="output 'y' has shape"):
        await b.submit(request(2, 1))


async def test_close_fails_pending_and_refuses_new():
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=1, max_delay_ms=0.0)
    running = asyncio.ensure_future(b.submit(request(1, 1)))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(b.submit(request(1, 2)))
    await asyncio.sleep(0)
    await b.close("model demo is being unloaded")
    for t in (running, queued):
        with pytest.raises(ModelUnavailable, match="being unloaded"):
            await t
    with pytest.raises(ModelUnavailable):
        await b.submit(request(1, 3))
    model.gate.set()
    await asyncio.sleep(0.01)
    assert len(model.batches) == 1


async def test_hot_path_overhead_is_small():
    """Batcher cost per request with a no-op model (no delay): tens of microseconds."""

    async def noop(inputs):
        return inputs

    b = make(noop, max_batch_size=1, max_delay_ms=0.0)
    x = {"x": np.zeros((1, 4), np.float32)}
    for _ in range(200):
        await b.submit(x)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        await b.submit(x)
    per = (time.perf_counter() - t0) / n
    assert per < 500e-6, per


async def test_lowered_timeout_applies_to_new_requests_on_time():
    model = Model()
    model.gate = asyncio.Event()
    b = make(model, max_batch_size=1, max_delay_ms=0.0, timeout_s=5.0)
    old = asyncio.ensure_future(b.submit(request(1, 1)))  # runs, blocked (5 s deadline)
    await asyncio.sleep(0.01)
    b.configure(timeout_s=0.05)
    t0 = time.perf_counter()
    with pytest.raises(RequestTimeout, match="0.05 s"):
        await b.submit(request(1, 2))
    assert time.perf_counter() - t0 < 0.2  # not held back by the older, longer deadline
    assert not old.done()
    model.gate.set()
    out, _ = await old
    assert (out["row_id"] == 1).all()


async def test_finished_requests_do_not_pile_up_in_the_deadline_queue():
    async def echo(inputs):
        return {"y": inputs["x"] + 1}

    b = make(echo, max_batch_size=4, max_delay_ms=0.0, timeout_s=60.0)
    for i in range(3000):
        await b.submit(request(1, i))
    assert sum(len(dq) for dq in b._deadlines.values()) <= 1100


async def test_shared_memory_exhaustion_fails_the_batch_not_the_batcher():
    pool = BufferPool(f"lastmile-{os.getpid()}-exhaust-")
    pool.close()  # every acquire now fails with ShmError
    b = make(Model(), max_delay_ms=0.0, pool=pool)
    with pytest.raises(Exception, match="pool is closed"):
        await asyncio.wait_for(b.submit(request(1, 1)), 2)
    assert b.stats()["errors"] == 1 and b.stats()["in_flight"] == 0
