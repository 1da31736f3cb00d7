"""Runner processes with the real demo models: ONNX Runtime and DeepSpeed sessions in real
forkserver children, real shared memory in /dev/shm, real signals. Nothing is mocked."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from lastmile.models.demo import example_inputs
from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.batcher import Batcher
from lastmile.runtime.errors import InferenceError, LoadError, LoadTimeout, ModelUnavailable, RunnerDied
from lastmile.runtime.errors import describe_exit
from lastmile.runtime.pool import RunnerPool
from lastmile.runtime.runner import PIPELINE_DEPTH, Runner
from lastmile.runtime.shm import cleanup_stale, count_segments

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(demo_store: Path) -> ModelStore:
    return ModelStore(demo_store)


@pytest.fixture
def pool(shm_pool):
    return shm_pool


def settings_for(manifest, **changes) -> ModelSettings:
    return ModelSettings().overlay(manifest.settings).overlay(changes)


def in_process(manifest, settings, inputs_list):
    """The reference: the same backend, loaded in this process."""
    from lastmile.runtime.backends import create_backend

    backend = create_backend(manifest, settings)
    try:
        return [backend.run(x) for x in inputs_list]
    finally:
        backend.close()


async def start(manifest, settings, pool, instance=0, **kw) -> Runner:
    runner = Runner(manifest, settings, pool=pool, instance=instance)
    await runner.start(**kw)
    return runner


@pytest.mark.parametrize("name", ["demo-mlp", "demo-mlp-ds"])
async def test_runner_outputs_equal_in_process_backend(forkserver, store, pool, name):
    manifest = store.get(name)
    settings = settings_for(manifest)
    phases = []
    runner = Runner(manifest, settings, pool=pool)
    started = time.perf_counter()
    info = await runner.start(on_phase=lambda step, data: phases.append(step))
    start_s = time.perf_counter() - started
    try:
        assert phases == ["spawning", "loading", "warming", "ready"]
        assert info["pid"] == runner.pid and runner.alive and runner.pid != os.getpid()
        assert info["backend"] == ("onnxruntime" if name == "demo-mlp" else "deepspeed")
        if name.endswith("-ds"):  # pinned before the forkserver imported deepspeed
            assert info["deepspeed_accelerator"] == os.environ["DS_ACCELERATOR"]
        assert info["load_s"] > 0 and info["warmup_rows"] == [1, settings.max_batch_size]
        # The forkserver already imported the libraries: a start costs the model load only.
        assert start_s < 10, start_s
        batches = [example_inputs("mlp", n) for n in (1, 5, 32)]
        got = [await runner.run(x) for x in batches]
        want = in_process(manifest, settings, batches)
        for g, w, x in zip(got, want, batches):
            assert set(g) == {"logits"} and g["logits"].shape == (len(x["input"]), 10)
            np.testing.assert_allclose(g["logits"], w["logits"], rtol=1e-5, atol=1e-6)
            assert g["logits"].flags.owndata  # a copy: the pool buffer can be reused at once
        mem = await runner.memory()
        assert mem["rss"] > 0 and 0 < mem["uss"] < mem["rss"]  # forkserver pages are shared
        assert isinstance(mem["backend"], dict)
        await runner.shrink()
        np.testing.assert_allclose((await runner.run(batches[0]))["logits"], want[0]["logits"], rtol=1e-5, atol=1e-6)
        assert pool.stats()["bytes_in_use"] == 0
    finally:
        await runner.stop()
    assert runner.state == "stopped" and runner.exitcode == 0 and not runner.alive
    assert not psutil.pid_exists(runner.pid) or psutil.Process(runner.pid).status() == psutil.STATUS_ZOMBIE


async def test_outputs_larger_than_the_guess_and_variable_shapes(forkserver, store, pool):
    """demo-lm's output size depends on the sequence length: the first batch of each shape
    asks for a bigger output buffer; later ones of that shape are served without asking."""
    manifest = store.get("demo-lm")
    settings = settings_for(manifest)
    runner = await start(manifest, settings, pool)
    try:
        batches = [example_inputs("lm", 2, seq=16), example_inputs("lm", 8, seq=64), example_inputs("lm", 8, seq=64)]
        got = [await runner.run(x) for x in batches]
        want = in_process(manifest, settings, batches)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g["logits"], w["logits"], rtol=1e-4, atol=1e-5)
        misses = pool.stats()["misses"]
        await runner.run(batches[1])
        assert pool.stats()["misses"] == misses  # steady state: no new segment
    finally:
        await runner.stop()


async def test_kill_mid_traffic_fails_fast_and_leaks_nothing(forkserver, store, pool):
    manifest = store.get("demo-mlp")
    settings = settings_for(manifest)
    a, b = await asyncio.gather(start(manifest, settings, pool, 0), start(manifest, settings, pool, 1))
    exits = []
    a.on_exit = lambda runner, code: exits.append((runner, code))
    x = example_inputs("mlp", 32)
    want = in_process(manifest, settings, [x])[0]["logits"]
    errors: list[tuple[float, BaseException]] = []
    killed_at = 0.0

    async def traffic(runner, n):
        for _ in range(n):
            try:
                out = await runner.run(x)
                np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
            except RunnerDied as exc:
                errors.append((time.perf_counter(), exc))
                return
            await asyncio.sleep(0)

    try:
        ta = asyncio.ensure_future(traffic(a, 100000))
        tb = asyncio.ensure_future(traffic(b, 300))
        await asyncio.sleep(0.2)
        killed_at = time.perf_counter()
        os.kill(a.pid, signal.SIGKILL)
        await asyncio.wait_for(ta, 5)
        assert errors, "run() did not fail after the kill"
        failed_at, exc = errors[0]
        assert failed_at - killed_at < 1.0
        assert str(exc) == "runner for demo-mlp died (SIGKILL)" and exc.exitcode == -9
        assert exits == [(a, -9)] and not a.alive and a.state == "dead"
        with pytest.raises(RunnerDied, match="SIGKILL"):
            await a.run(x)
        await asyncio.wait_for(tb, 60)  # the other runner never noticed
        assert b.alive and b.batches >= 300
        # Every segment on disk belongs to the pool, none is still lent out.
        assert pool.stats()["bytes_in_use"] == 0
        assert count_segments(pool.prefix) == pool.stats()["segments"]
        assert sorted(os.listdir("/dev/shm")) == sorted(set(os.listdir("/dev/shm")))
    finally:
        await asyncio.gather(a.stop(), b.stop())
    assert exits == [(a, -9)]  # stop() after death does not call on_exit again


async def test_broken_artifact_is_a_clear_load_error(forkserver, store, pool, tmp_path):
    src = store.get("demo-mlp").path
    dst = tmp_path / "store" / "broken-mlp"
    shutil.copytree(src, dst)
    (dst / "model.toml").write_text((dst / "model.toml").read_text().replace('"demo-mlp"', '"broken-mlp"'))
    (dst / "model.onnx").write_bytes(b"this is not an onnx protobuf")
    manifest = ModelStore(tmp_path / "store").get("broken-mlp")
    runner = Runner(manifest, settings_for(manifest), pool=pool)
    exits = []
    runner.on_exit = lambda r, c: exits.append(c)
    with pytest.raises(LoadError) as err:
        await runner.start()
    message = str(err.value)
    assert message.startswith("broken-mlp: ")
    assert "Traceback" not in message and "\n  File " not in message
    assert "onnx" in message.lower() or "protobuf" in message.lower()
    assert not runner.alive and exits == []  # a failed load is start()'s error, not a crash
    await asyncio.sleep(0.05)
    assert not psutil.pid_exists(runner.pid) or psutil.Process(runner.pid).status() == psutil.STATUS_ZOMBIE


async def test_load_timeout_kills_the_child(forkserver, store, pool):
    manifest = store.get("demo-mlp-ds")
    runner = Runner(manifest, settings_for(manifest), pool=pool)
    with pytest.raises(LoadTimeout, match="longer than 0.01 s; runner process killed"):
        await runner.start(timeout_s=0.01)
    assert not runner.alive and runner.exitcode == -signal.SIGKILL


async def test_inference_error_keeps_the_runner_up(forkserver, store, pool):
    manifest = store.get("demo-mlp")
    runner = await start(manifest, settings_for(manifest), pool)
    try:
        with pytest.raises(InferenceError) as err:
            await runner.run({"input": np.zeros((2, 63), np.float32)})
        assert str(err.value).startswith("demo-mlp: ") and "Traceback" not in str(err.value)
        out = await runner.run(example_inputs("mlp", 2))
        assert out["logits"].shape == (2, 10) and runner.alive
        assert pool.stats()["bytes_in_use"] == 0
    finally:
        await runner.stop()


async def test_cancelled_run_keeps_buffers_until_the_child_answers(forkserver, store, pool):
    manifest = store.get("demo-lm")
    settings = settings_for(manifest)
    runner = await start(manifest, settings, pool)
    try:
        big = example_inputs("lm", 8, seq=64)
        task = asyncio.ensure_future(runner.run(big))
        await asyncio.sleep(0)  # sent to the child
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The child still reads/writes them: not back in the pool until it answers.
        assert pool.stats()["bytes_in_use"] > 0
        small = example_inputs("lm", 1, seq=4)
        out = await runner.run(small)  # waits for the dropped batch, then runs
        want = in_process(manifest, settings, [small])[0]["logits"]
        np.testing.assert_allclose(out["logits"], want, rtol=1e-4, atol=1e-5)
        assert pool.stats()["bytes_in_use"] == 0
    finally:
        await runner.stop()


async def test_batches_sent_ahead_each_get_their_own_outputs(forkserver, store, pool):
    """Up to PIPELINE_DEPTH batches wait in the child's pipe; each caller still gets exactly
    its own rows, in new shapes too (each asks for a bigger output buffer mid-pipeline), and
    a dropped one in the middle frees its slot and buffers when the child answers."""
    manifest = store.get("demo-lm")
    settings = settings_for(manifest)
    runner = await start(manifest, settings, pool)
    try:
        batches = [example_inputs("lm", rows, seq=seq) for rows, seq in ((2, 8), (8, 64), (3, 32), (5, 64), (1, 16))]
        want = in_process(manifest, settings, batches)
        tasks = [asyncio.ensure_future(runner.run(x)) for x in batches]
        await asyncio.sleep(0)
        assert len(runner._calls) == PIPELINE_DEPTH  # the rest wait for a slot
        tasks[1].cancel()
        for i, task in enumerate(tasks):
            if i == 1:
                with pytest.raises(asyncio.CancelledError):
                    await task
                continue
            np.testing.assert_allclose((await task)["logits"], want[i]["logits"], rtol=1e-4, atol=1e-5)
        assert not runner._calls and pool.stats()["bytes_in_use"] == 0
    finally:
        await runner.stop()


async def test_stop_is_graceful_then_forceful(forkserver, store, pool):
    manifest = store.get("demo-mlp")
    runner = await start(manifest, settings_for(manifest), pool)
    pid = runner.pid
    batch = asyncio.ensure_future(runner.run(example_inputs("mlp", 4)))
    await asyncio.sleep(0)
    await runner.stop()
    assert (await batch)["logits"].shape == (4, 10)  # the batch in flight finished first
    assert runner.exitcode == 0 and not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ModelUnavailable, match="stopped"):
        await runner.run(example_inputs("mlp", 1))
    await runner.stop()  # idempotent
    pool.close()
    assert count_segments(pool.prefix) == 0


async def test_batcher_packs_straight_into_the_runners_pool(forkserver, store, pool):
    """The daemon's path: Batcher(pool) -> RunnerPool -> two runners -> each caller its own rows."""
    manifest = store.get("demo-mlp")
    settings = settings_for(manifest)
    runners = RunnerPool("demo-mlp")
    for r in await asyncio.gather(*(start(manifest, settings, pool, i) for i in range(2))):
        runners.add(r)
    batcher = Batcher(runners.run, max_batch_size=32, max_delay_ms=2.0, max_queue=1000, timeout_s=30.0, concurrency=2, pool=pool)
    sizes = [1 + (i * 7) % 9 for i in range(80)]
    requests = [example_inputs("mlp", n) for n in sizes]
    for i, r in enumerate(requests):
        r["input"] = r["input"] + np.float32(i)  # distinct rows per request
    try:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        want = in_process(manifest, settings, requests)
        for (out, info), w in zip(results, want):
            np.testing.assert_allclose(out["logits"], w["logits"], rtol=1e-4, atol=1e-4)
        stats = batcher.stats()
        assert stats["batches"] < len(requests) and stats["avg_batch_size"] > 1
        assert pool.stats()["bytes_in_use"] == 0
        assert all(r.batches > 0 for r in runners)  # both runners took batches
    finally:
        await batcher.close("test over")
        await runners.stop()
    assert len(runners) == 0


def test_describe_exit():
    assert describe_exit(-9) == "SIGKILL"
    assert describe_exit(-15) == "SIGTERM"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-200) == "signal 200"


def test_daemon_death_takes_its_runners_and_leaves_only_stale_segments(tmp_path, demo_store):
    """A daemon killed with SIGKILL: its forkserver exits, the runner dies with it
    (PR_SET_PDEATHSIG), and the segments it left are found by cleanup_stale. The script has
    no ``if __name__ == "__main__"`` guard on purpose: a runner must not re-import the
    daemon's main module (it would start another runner, and fail)."""
    script = tmp_path / "daemon.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import lastmile.runtime.forkserver as fs
        import lastmile.runtime.runner as rr
        fs.PRELOAD[:] = ["numpy", "lastmile.runtime.forkserver", "lastmile.runtime.runner_main"]   # a light forkserver for this test
        from lastmile.models.settings import ModelSettings
        from lastmile.models.store import ModelStore
        from lastmile.models.demo import example_inputs
        from lastmile.runtime.shm import BufferPool

        async def main():
            m = ModelStore({str(demo_store)!r}).get("demo-mlp")
            pool = BufferPool(f"lastmile-{{os.getpid()}}-demo-mlp-")
            r = rr.Runner(m, ModelSettings(), pool=pool)
            await r.start()
            await r.run(example_inputs("mlp", 2))
            print(r.pid, pool.prefix, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "daemon script failed"
        child_pid, prefix = int(line.split()[0]), line.split()[1]
        assert psutil.pid_exists(child_pid) and count_segments(prefix) > 0
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "runner outlived its daemon"
            time.sleep(0.05)
        removed = cleanup_stale()
        assert len([n for n in removed if n.startswith(prefix)]) > 0
        assert count_segments(prefix) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.slow
async def test_benchmark_ipc_overhead(forkserver, store, pool, capsys):
    """Numbers for the report (``pytest -m slow -s``): forkserver warm-up, start -> ready,
    and what one 1x64 batch costs through ``Runner.run`` against ``backend.run`` in-process.
    The child times its own ``backend.run``, so the IPC overhead is measured on the same
    batches. Loose bound only: timings depend on the machine and on its load."""
    from lastmile.runtime.backends import create_backend

    manifest = store.get("demo-mlp")
    settings = settings_for(manifest)
    x = example_inputs("mlp", 1)
    backend = create_backend(manifest, settings)
    for _ in range(300):
        backend.run(x)
    t = []
    for _ in range(3000):
        t0 = time.perf_counter()
        backend.run(x)
        t.append(time.perf_counter() - t0)
    backend.close()
    in_process = float(np.median(t))

    started = time.perf_counter()
    runner = await start(manifest, settings, pool)
    start_s = time.perf_counter() - started
    try:
        for _ in range(300):
            await runner.run(x)
        t = []
        b0, n0 = runner.backend_s, runner.batches
        for _ in range(3000):
            t0 = time.perf_counter()
            await runner.run(x)
            t.append(time.perf_counter() - t0)
        child_backend = (runner.backend_s - b0) / (runner.batches - n0)
        through_runner = float(np.median(t))
    finally:
        await runner.stop()
    with capsys.disabled():
        print(
            f"\nforkserver warm-up {forkserver:.2f} s | demo-mlp start->ready {start_s * 1000:.0f} ms"
            f"\nbackend.run in-process p50 {in_process * 1e6:.0f} us | Runner.run p50 {through_runner * 1e6:.0f} us"
            f" | backend.run in the child (mean) {child_backend * 1e6:.0f} us"
            f" | IPC + copies {(through_runner - child_backend) * 1e6:.0f} us"
        )
    assert through_runner - child_backend < 5e-3
