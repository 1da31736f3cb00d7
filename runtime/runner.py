"""Runner processes: one per loaded model instance, driven from the daemon's asyncio loop.

Why a process per model: a crash, OOM kill or hang in one model never takes the daemon or
the other models down, unloading really returns memory to the OS, and per-model memory is
measurable. Each runner is a ``fork`` of the preloaded forkserver
(:mod:`lastmile.runtime.forkserver`), so loading a model costs the model's load, not
interpreter and library start-up.

Data path of one batch (messages: :mod:`lastmile.runtime.protocol`; the child's side:
:mod:`lastmile.runtime.runner_main`)::

    inputs --pack--> pool buffer (or the batcher's buffer, no copy) --Run(name, layout)--> child
    child: views over the segment -> backend.run -> outputs packed into the out buffer -> Done
    daemon: views over the out buffer -> one copy into the result -> buffers back to the pool

The daemon owns every segment (the pool), the child only maps them, so a dying child leaks
nothing. The output buffer is lent with the request, sized from the manifest (fixed output
dims) or from what the same input signature produced last time; only when the outputs do not
fit does the child ask for a bigger one (one extra message, the first batch of a new shape).

A runner holds up to :data:`PIPELINE_DEPTH` batches: the next one waits in the child's pipe
while the current one computes, so the child goes straight on to it instead of idling while
the daemon hands out results and cuts another batch (the daemon's event loop is busy exactly
when the model is).

Control messages go over two one-way pipes (they wake the other side faster than a
socketpair) watched with ``loop.add_reader`` (no thread per message); the process sentinel
is watched the same way, so a child that dies mid-batch fails the awaiting ``run()`` at once
with :class:`RunnerDied`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime import runner_main
from lastmile.runtime.errors import InferenceError, LoadError, LoadTimeout, ModelUnavailable, RunnerDied, ShmError, describe_exit
from lastmile.runtime.forkserver import RunnerProcess, get_context
from lastmile.runtime.protocol import (
    Done,
    Failed,
    LoadFailed,
    MemoryQuery,
    Need,
    OutBuffer,
    Phase,
    Ready,
    Run,
    Shrink,
    Stop,
    ToDaemon,
    ToRunner,
    decode,
    encode,
)
from lastmile.runtime.runner_main import BackendFactory
from lastmile.runtime.shm import ALIGN, Buffer, BufferPool, PackedArrays, layout_of, pack, views

logger = logging.getLogger("lastmile.runner")

#: Batches a runner holds at once (one computing, the rest queued in its pipe).
PIPELINE_DEPTH = 2

PhaseCallback = Callable[[str, dict], None]
ExitCallback = Callable[["Runner", "int | None"], None]


# --- one call in flight ---------------------------------------------------------------------


class _Call:
    """A request sent to the child and the shared-memory buffers it holds until the child
    answers, even when the caller gave up (the child may still read/write them)."""

    __slots__ = ("fut", "bufs", "out", "layout_in", "finished", "abandoned", "on_answer", "grew")

    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut
        self.bufs: list[Buffer] = []
        self.out: Buffer | None = None
        self.finished = False
        self.abandoned = False
        self.on_answer: Callable[[], None] | None = None  # for an abandoned call: frees its slot
        self.layout_in: tuple = ()
        self.grew = False  # the child asked for a bigger output buffer

    def release(self, pool: BufferPool) -> None:
        bufs, self.bufs = self.bufs, []
        if self.out is not None:
            bufs.append(self.out)
            self.out = None
        for buf in bufs:
            try:
                pool.release(buf)
            except ShmError:
                pass

    def answered(self, pool: BufferPool) -> bool:
        """Mark the child's answer (or death) as come; an abandoned call's buffers and slot
        are freed here, and True says there is no caller left to tell."""
        self.finished = True
        if not self.abandoned:
            return False
        self.release(pool)
        if self.on_answer is not None:
            self.on_answer()
        return True


# --- the runner -------------------------------------------------------------------------------


class Runner:
    """One model instance in its own process. All methods run on one asyncio loop."""

    #: The child's entry point (``runner_main.main``'s arguments); a subclass whose child
    #: serves other messages (generation: :mod:`lastmile.runtime.generation.serve`) names its own.
    child_target: Callable[..., None] = staticmethod(runner_main.main)

    def __init__(self, manifest: Manifest, settings: ModelSettings, *, pool: BufferPool, instance: int = 0,
                 backend_factory: BackendFactory | None = None) -> None:
        self.manifest = manifest
        self.settings = settings
        self.pool = pool
        self.instance = instance
        self.name = manifest.name
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.on_exit: ExitCallback | None = None
        self.info: dict[str, Any] = {}
        self.state = "new"  # new | starting | ready | stopping | stopped | dead
        self.batches = 0
        self.backend_s = 0.0  # time the backend computed, summed over batches (child side)
        self.last_backend_s = 0.0
        self._factory = backend_factory
        self._proc: RunnerProcess | None = None
        self._rx: Connection | None = None  # child -> daemon
        self._tx: Connection | None = None  # daemon -> child
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._slots: asyncio.Semaphore | None = None
        self._ready: asyncio.Future | None = None
        self._exited: asyncio.Future | None = None
        self._on_phase: PhaseCallback | None = None
        self._epoch = pool.epoch
        self._out_per_row: dict[tuple, int] = {}
        self._static_out_per_row = self._static_output_bytes(manifest)
        self._death: str | None = None
        self._reading = False

    # --- properties ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready", "stopping") and self.exitcode is None

    @property
    def busy(self) -> bool:
        return bool(self._calls)

    def __repr__(self) -> str:
        return f"Runner({self.name!r}#{self.instance}, pid={self.pid}, state={self.state})"

    # --- start --------------------------------------------------------------------------------

    async def start(self, on_phase: PhaseCallback | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
        """Spawn the child, load and warm the model; returns ``backend.info()`` plus ``pid``,
        ``load_s`` (model load in the child), ``warmup_s``, ``warmup_rows`` and ``start_s``
        (spawn to ready). ``timeout_s`` covers all of it, a cold forkserver's boot included.

        Warm-up runs zero inputs of 1 and of ``max_batch_size`` rows (variable dims set to 1):
        a model that cannot run its largest batch fails here, with numbers, instead of on
        the first busy minute; and the memory sampled after start includes that workspace."""
        if self.state != "new":
            raise RuntimeError(f"runner for {self.name} was already started (state {self.state})")
        loop = self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(PIPELINE_DEPTH)
        self._on_phase = on_phase
        self._ready = loop.create_future()
        self._ready.add_done_callback(_retrieve)  # start() may have given up on it already
        self._exited = loop.create_future()
        self.state = "starting"
        started = time.perf_counter()
        self._phase("spawning", {"instance": self.instance})
        ctx = get_context()
        child_rx, parent_tx = ctx.Pipe(duplex=False)
        parent_rx, child_tx = ctx.Pipe(duplex=False)
        proc = RunnerProcess(
            target=self.child_target,
            args=(child_rx, child_tx, self.manifest, self.settings, self.name, self._factory),
            name=f"lastmile-runner:{self.name}#{self.instance}",
            daemon=True,
        )
        spawn = loop.run_in_executor(None, proc.start)  # blocks until the forkserver is up
        try:
            await asyncio.shield(spawn)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                spawn.add_done_callback(lambda f: proc.kill() if not f.exception() else None)
            for c in (child_rx, child_tx, parent_rx, parent_tx):
                c.close()
            self.state = "stopped"
            if isinstance(exc, Exception):
                raise LoadError(f"could not start a runner process for {self.name}: {exc}") from exc
            raise
        child_rx.close()
        child_tx.close()
        self._proc, self._rx, self._tx, self.pid = proc, parent_rx, parent_tx, proc.pid
        loop.add_reader(parent_rx.fileno(), self._on_readable)
        self._reading = True
        loop.add_reader(proc.sentinel, self._on_sentinel)
        remaining = max(0.001, timeout_s - (time.perf_counter() - started))
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), remaining)
        except asyncio.TimeoutError:
            await self._kill_and_wait()
            raise LoadTimeout(f"loading {self.name} took longer than {timeout_s:g} s; runner process killed") from None
        except LoadError:
            if not await self._wait_exit(5.0):
                await self._kill_and_wait()
            raise
        except BaseException:
            await self._kill_and_wait()
            raise
        info = dict(info)
        info.update(pid=self.pid, start_s=round(time.perf_counter() - started, 4))
        self.info = info
        self.state = "ready"
        self._phase("ready", info)
        return info

    def _phase(self, name: str, data: dict) -> None:
        if self._on_phase is not None:
            try:
                self._on_phase(name, data)
            except Exception:  # a UI callback must not break a load
                logger.exception("on_phase callback failed")

    # --- serving ------------------------------------------------------------------------------

    async def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one whole batch in the child; returns fresh arrays (copied once out of shared
        memory). Raises :class:`RunnerDied` (the child is gone, at once when it dies
        mid-batch), :class:`InferenceError` (the backend raised; the runner stays up) or
        :class:`ModelUnavailable` (stopped). Up to :data:`PIPELINE_DEPTH` batches are sent at
        once (the child runs them in order); further callers wait. If the caller is cancelled
        the child still finishes the batch: its buffers and its slot are freed when it
        answers."""
        if self.state != "ready":
            raise self._unavailable()
        assert self._slots is not None and self._loop is not None
        await self._slots.acquire()
        slot_handed_over = False
        try:
            if self.state != "ready":
                raise self._unavailable()
            call = _Call(self._loop.create_future())
            seq = next(self._seq)
            try:
                rows, key = self._prepare(call, inputs)
                if self.pool.epoch == self._epoch:
                    unmapped: tuple | None = ()
                else:
                    unmapped, self._epoch = self.pool.unlinked_since(self._epoch)
                self._calls[seq] = call
                self._tx.send_bytes(encode(Run(seq, call.bufs[0].name, call.layout_in, call.out.name, call.out.size, unmapped)))
            except BaseException as exc:
                self._calls.pop(seq, None)
                call.release(self.pool)
                if isinstance(exc, OSError):  # the child is gone; the sentinel says how
                    await self._wait_exit(1.0)
                    raise self._unavailable() from None
                raise
            try:
                out_layout = await call.fut
            except asyncio.CancelledError:
                if call.finished:
                    call.release(self.pool)
                else:  # the child still has the buffers: they are freed on its answer
                    call.abandoned = True
                    call.on_answer = self._slots.release
                    slot_handed_over = True
                raise
            except BaseException:
                call.release(self.pool)
                raise
            try:
                result = {name: arr.copy() for name, arr in views(call.out.mm, out_layout).items()}
            finally:
                call.release(self.pool)
            if call.grew or key not in self._out_per_row:
                self._learn(key, rows, out_layout)
            self.batches += 1
            return result
        finally:
            if not slot_handed_over:
                self._slots.release()

    def _prepare(self, call: _Call, inputs: dict[str, np.ndarray]) -> tuple[int, tuple]:
        """Input buffer (the batcher's when it packed into our pool) and an output buffer
        sized from what this input signature produced before."""
        if isinstance(inputs, PackedArrays) and self.pool.owns(inputs.buffer):
            call.bufs.append(self.pool.retain(inputs.buffer))
            call.layout_in = inputs.layout
        else:
            layout, total = layout_of(inputs)
            buf = self.pool.acquire(total)
            call.bufs.append(buf)
            pack(inputs, buf.mm, layout)
            call.layout_in = layout
        rows = 0
        key = []
        for slot in call.layout_in:
            shape = slot[2]
            rows = shape[0] if shape else 1
            key.append((slot[0], slot[1], shape[1:]))
        key = tuple(key)
        per_row = self._out_per_row.get(key, self._static_out_per_row)
        call.out = self.pool.acquire(rows * per_row + ALIGN * max(1, len(self.manifest.outputs)))
        return rows, key

    def _learn(self, key: tuple, rows: int, out_layout: tuple) -> None:
        """Remember the output bytes per row of this input signature (next guess is exact)."""
        if rows <= 0 or not out_layout:
            return
        name, dtype, shape, offset = out_layout[-1]
        total = offset + math.prod(shape) * np.dtype(dtype).itemsize
        per_row = -(-total // rows)
        if per_row > self._out_per_row.get(key, 0):
            if len(self._out_per_row) > 1024:
                self._out_per_row.clear()
            self._out_per_row[key] = per_row

    @staticmethod
    def _static_output_bytes(manifest: Manifest) -> int:
        """Bytes per row of the outputs when every non-batch dim is fixed, else 0 (learned)."""
        total = 0
        for spec in manifest.outputs:
            dims = spec.shape[1:]
            if any(d < 0 for d in dims):
                return 0
            total += math.prod(dims) * spec.numpy_dtype.itemsize + ALIGN
        return total

    def _unavailable(self) -> Exception:
        if self.state == "dead":
            return RunnerDied(self._death or f"runner for {self.name} died", self.exitcode)
        if self.state in ("stopping", "stopped"):
            return ModelUnavailable(f"runner for {self.name} is {self.state}")
        return ModelUnavailable(f"runner for {self.name} is not ready (state {self.state})")

    async def memory(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """``rss``/``uss``/``swap`` of the child (the memory room's /proc reader) and ``backend``: what the
        backend reports (device memory...). A busy child answers after its batch; past
        ``timeout_s`` ``backend`` is None."""
        out: dict[str, Any] = {"pid": self.pid}
        if self.pid is None or not self.alive:
            return out
        try:
            from lastmile.runtime.memory.procfs import read_proc_memory

            mem = read_proc_memory(self.pid)
            out.update(rss=mem["rss"], uss=mem["uss"], swap=mem["swap"])
        except OSError as exc:  # gone or not allowed: say so, don't fail
            out["error"] = str(exc)
        try:
            out["backend"] = await asyncio.wait_for(self._request(MemoryQuery), timeout_s)
        except (asyncio.TimeoutError, InferenceError, RunnerDied, ModelUnavailable):
            out["backend"] = None
        return out

    async def shrink(self) -> None:
        """Ask the backend to give cached memory back, drop stale segment mappings, trim the
        C heap."""
        unmapped, self._epoch = self.pool.unlinked_since(self._epoch)
        await self._request(Shrink, unmapped)

    async def _request(self, kind: Callable[..., ToRunner], *fields: Any) -> Any:
        """Send ``kind(seq, *fields)`` and wait for its :class:`Done` payload."""
        if self.state != "ready":
            raise self._unavailable()
        assert self._loop is not None
        seq = next(self._seq)
        call = _Call(self._loop.create_future())
        self._calls[seq] = call
        try:
            self._tx.send_bytes(encode(kind(seq, *fields)))
        except OSError:
            self._calls.pop(seq, None)
            raise self._unavailable() from None
        try:
            return await call.fut
        except asyncio.CancelledError:
            call.abandoned = not call.finished
            raise

    # --- stop ---------------------------------------------------------------------------------

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Finish the batch in flight, stop the child (``stop`` message, then SIGKILL after
        ``timeout_s``); idempotent. The pool's segments stay with the pool's owner."""
        if self.state in ("new",):
            self.state = "stopped"
            return
        if self.state in ("stopped", "dead"):
            return
        self.state = "stopping"
        try:
            self._tx.send_bytes(encode(Stop()))
        except (OSError, AttributeError):
            pass
        if not await self._wait_exit(timeout_s):
            await self._kill_and_wait()

    async def _wait_exit(self, timeout_s: float) -> bool:
        if self._exited is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _kill_and_wait(self) -> None:
        if self._proc is not None and self.exitcode is None:
            if self.state not in ("dead", "stopped"):
                self.state = "stopping"
            try:
                self._proc.kill()
            except (OSError, ValueError, AttributeError):
                pass
            await self._wait_exit(10.0)

    def kill(self) -> None:
        """SIGKILL the child (tests, last-resort mitigation); ``on_exit`` fires as for a crash."""
        if self._proc is not None and self.exitcode is None:
            self._proc.kill()

    # --- event-loop callbacks -------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            msg = decode(self._rx.recv_bytes())
        except (EOFError, OSError):
            # The child closed its end (exiting): the sentinel tells how it ended.
            self._stop_reading()
            return
        self._dispatch(msg)

    def _dispatch(self, msg: ToDaemon) -> None:
        """One message from the child (a subclass handles its own kinds, then calls this)."""
        kind = type(msg)
        if kind is Done or kind is Failed:
            call = self._calls.pop(msg.seq, None)
            if call is None:
                return
            if not call.answered(self.pool) and not call.fut.done():
                if kind is Done:
                    if msg.backend_s:  # a batch (memory and shrink answers carry none)
                        self.last_backend_s = msg.backend_s
                        self.backend_s += msg.backend_s
                    call.fut.set_result(msg.payload)
                else:
                    call.fut.set_exception(InferenceError(f"{self.name}: {msg.error}"))
        elif kind is Need:
            self._grow_output(msg.seq, msg.nbytes)
        elif kind is Phase:
            self._phase(msg.name, msg.data)
        elif kind is Ready:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg.info)
        elif kind is LoadFailed:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(LoadError(f"{self.name}: {msg.error}"))
        else:
            logger.warning("runner %s sent an unexpected message %r", self.pid, msg)

    def _grow_output(self, seq: int, nbytes: int) -> None:
        """The outputs did not fit the guessed buffer: lend a bigger one (first batch of a new
        input signature, or a data-dependent output size)."""
        call = self._calls.get(seq)
        try:
            if call is None:
                raise ShmError("the batch is no longer pending")
            buf = self.pool.acquire(nbytes)
        except ShmError as exc:
            self._send_quiet(OutBuffer(seq, None, 0, str(exc)))
            return
        old, call.out = call.out, buf
        call.grew = True
        if old is not None:
            self.pool.release(old)
        self._send_quiet(OutBuffer(seq, buf.name, buf.size))

    def _send_quiet(self, msg: ToRunner) -> None:
        """Send when the child is still there; a gone child is the sentinel's news."""
        try:
            if self._tx is not None:
                self._tx.send_bytes(encode(msg))
        except (OSError, ValueError):  # ValueError: the pipe was closed on exit
            pass

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None and self._rx is not None:
            self._loop.remove_reader(self._rx.fileno())
            self._reading = False

    def _on_sentinel(self) -> None:
        """The child exited: fail everything waiting on it at once, release its buffers, tell
        the owner (``on_exit``) when nobody asked it to stop."""
        assert self._loop is not None
        proc = self._proc
        self._loop.remove_reader(proc.sentinel)
        self._stop_reading()
        code = proc.exitcode
        self.exitcode = code
        expected = self.state in ("stopping", "stopped")
        notify = self.state == "ready"  # a failed load is start()'s error, not a crash
        self._death = f"runner for {self.name} died ({describe_exit(code)})"
        self.state = "stopped" if expected else "dead"
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if not call.answered(self.pool) and not call.fut.done():
                if expected:
                    call.fut.set_exception(ModelUnavailable(f"runner for {self.name} was stopped"))
                else:
                    call.fut.set_exception(RunnerDied(self._death, code))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(LoadError(f"{self.name}: runner process died while loading ({describe_exit(code)})"))
        for conn in (self._rx, self._tx):
            try:
                conn.close()
            except OSError:
                pass
        try:
            proc.close()
        except ValueError:
            pass
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)
        if notify:
            logger.warning("%s", self._death)
            callback, self.on_exit = self.on_exit, None
            if callback is not None:
                try:
                    callback(self, code)
                except Exception:
                    logger.exception("on_exit callback failed")


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


