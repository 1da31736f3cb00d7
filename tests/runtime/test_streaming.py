"""Streamed requests through a real runner process: one request, many messages, flow
control and cancellation. The backend is a tiny counting one (tests/runtime/stream_backend.py)
loaded in a real forkserver child through ``backend_factory``; what the child did is read
back from the log file its generator writes. Nothing is mocked."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from stream_backend import CountingBackend

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.errors import InferenceError, RunnerDied
from lastmile.runtime.protocol import Chunk, Done
from lastmile.runtime.runner import Runner
from lastmile.runtime.shm import BufferPool


@pytest.fixture
def pool(shm_pool):
    return shm_pool


@pytest.fixture
async def runner(forkserver, pool, tmp_path):
    r = await start(pool, tmp_path)
    yield r
    await r.stop()


async def start(pool: BufferPool, tmp_path: Path, **kw) -> Runner:
    manifest = Manifest(name="counting", path=tmp_path, format="onnx", artifact=tmp_path / "none")
    r = Runner(manifest, ModelSettings(), pool=pool, backend_factory=CountingBackend, **kw)
    await r.start()
    return r


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_one_request_many_messages_then_done(runner, tmp_path):
    log = tmp_path / "log"
    got = [m async for m in runner.stream("count", {"n": 50, "log": str(log)}, window=4)]
    assert [type(m) for m in got] == [Chunk] * 50 + [Done]
    assert [m.payload["i"] for m in got[:-1]] == list(range(50))
    assert got[-1].payload == {"total": 50} and got[-1].backend_s > 0
    assert len({m.seq for m in got}) == 1 and got[0].seq > 0
    assert lines(log)[-1] == "finished" and runner.open_streams == 0


async def test_cancelled_mid_way_the_child_stops_and_the_slot_is_freed(forkserver, pool, tmp_path):
    """max_streams=1: a second stream can only start once the first one's slot is free,
    which happens when the child confirms the cancel."""
    runner = await start(pool, tmp_path, max_streams=1)
    log = tmp_path / "log"
    try:
        first = runner.stream("count", {"n": 100_000, "log": str(log), "delay_s": 0.001}, window=8)
        async with first:
            taken = [await first.__anext__() for _ in range(5)]
            second = runner.stream("count", {"n": 3})
            waiting = asyncio.ensure_future(second.__anext__())
            await asyncio.sleep(0.2)
            assert not waiting.done() and runner.open_streams == 1  # the only slot is taken
        # Leaving the block sent Cancel: the child closed the generator, the slot came back.
        assert [m.payload["i"] for m in taken] == list(range(5))
        assert isinstance(await asyncio.wait_for(waiting, 5), Chunk)
        await until(lambda: any(line.startswith("cancelled after") for line in lines(log)))
        produced = int(next(line for line in lines(log) if line.startswith("cancelled")).split()[-1])
        assert 5 <= produced <= 5 + 8  # never more than the window ahead of the consumer
        assert first.cancelled_after == produced
        assert "finished" not in lines(log)
        rest = [m async for m in second]
        assert [type(m) for m in rest] == [Chunk, Chunk, Done]
        assert runner.open_streams == 0 and runner._stream_slots._value == 1
        out = await runner.run({"x": np.ones((2, 3), np.float32)})  # the runner serves on
        np.testing.assert_array_equal(out["double"], np.full((2, 3), 2, np.float32))
    finally:
        await runner.stop()


async def test_a_dropped_stream_is_cancelled_too(runner, tmp_path):
    log = tmp_path / "log"

    async def consume_three() -> None:
        async for m in runner.stream("count", {"n": 100_000, "log": str(log), "delay_s": 0.001}):
            if m.payload["i"] == 2:
                break  # no aclose(): the stream object is simply dropped

    await consume_three()
    await until(lambda: runner.open_streams == 0)
    assert any(line.startswith("cancelled after") for line in lines(log))


async def test_a_cancelled_consumer_task_cancels_its_stream(runner, tmp_path):
    log = tmp_path / "log"
    stream = runner.stream("count", {"n": 100_000, "log": str(log), "delay_s": 0.001})

    async def consume() -> None:
        async for _ in stream:
            pass

    task = asyncio.ensure_future(consume())
    await until(lambda: len(lines(log)) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: runner.open_streams == 0)
    assert stream.cancelled_after is not None and any(line.startswith("cancelled after") for line in lines(log))


async def test_a_slow_consumer_pauses_its_stream_not_the_runner(runner, tmp_path):
    log = tmp_path / "log"
    stream = runner.stream("count", {"n": 40, "log": str(log)}, window=4)
    first = await stream.__anext__()
    assert first.payload["i"] == 0
    await asyncio.sleep(0.3)
    assert len(lines(log)) == 4  # the child stopped at the window
    # A batch is not stuck behind the paused stream.
    out = await asyncio.wait_for(runner.run({"x": np.arange(3, dtype=np.float32)[None]}), 5)
    np.testing.assert_array_equal(out["double"], [[0, 2, 4]])
    rest = [m async for m in stream]
    assert [m.payload["i"] for m in rest[:-1]] == list(range(1, 40)) and rest[-1].payload == {"total": 40}


async def test_two_streams_interleave(runner, tmp_path):
    a = runner.stream("count", {"n": 30, "delay_s": 0.002}, window=2)
    b = runner.stream("count", {"n": 30, "delay_s": 0.002}, window=2)
    order: list[str] = []

    async def drain(name, stream):
        async for m in stream:
            if isinstance(m, Chunk):
                order.append(name)

    await asyncio.gather(drain("a", a), drain("b", b))
    assert order.count("a") == order.count("b") == 30
    assert order[:30].count("a") < 30  # b ran while a was still going


async def test_a_failing_stream_reports_and_the_runner_stays_up(runner):
    stream = runner.stream("fail", {"n": 10, "fail_at": 3})
    got = []
    with pytest.raises(InferenceError, match="^counting: counting failed at 3$"):
        async for m in stream:
            got.append(m.payload["i"])
    assert got == [0, 1, 2] and runner.alive and runner.open_streams == 0
    with pytest.raises(InferenceError, match="does not stream"):
        async for _ in runner.stream("generate", {}):
            pass
    with pytest.raises(ValueError, match="window"):
        runner.stream("count", {"n": 1}, window=0)


async def test_runner_death_fails_the_stream_at_once(runner):
    stream = runner.stream("count", {"n": 100_000, "delay_s": 0.001})
    await stream.__anext__()
    os.kill(runner.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RunnerDied, match="SIGKILL"):
        async for _ in stream:
            pass
    assert time.monotonic() - started < 2 and runner.open_streams == 0
