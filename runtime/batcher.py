"""The dynamic batcher: one per model, pure asyncio, in the daemon.

Requests are grouped by *signature* (input names, dtypes and every dim but dim 0), because
only those can be concatenated: LM requests of different sequence lengths wait in different
groups. Batching adapts to load instead of waiting on a clock: a request that finds a runner
free goes at once (one client gets the latency of no batching), and rows accumulate only
while every runner is busy (the queue is cut into a batch the moment one frees, so many
clients get big batches). One exception, bounded by ``max_delay_ms`` (a ceiling, never a
fixed wait): when a batch has just been answered, its clients are probably about to send
their next request, so a runner that frees with a *partial* batch queued waits for them
until they are all back, the batch is full, or ``max_delay_ms`` has passed since the answer.
Without that, closed-loop clients split into two half-size cohorts that alternate forever.
When several groups are ready, the one whose oldest request is oldest goes first, so no
signature starves another. Up to ``concurrency``
batches run at once (one per runner instance: ``run_batch``, the model's
:meth:`lastmile.runtime.pool.RunnerPool.run`, picks a free one), and while all
are busy one more *full* batch per runner may be sent ahead (it waits in the runner's pipe,
so the model never idles between batches under load; a partial batch keeps collecting rows
instead).

Everything happens on the event loop: ``submit`` appends to a deque and arms at most one
timer; a batch is one task (or runs in the task of its only request, when that request finds
a free runner and nothing queued); deadlines share one timer. No thread hops, no per-request
tasks or timers. Rows of requests that were cancelled or timed out before their batch was
cut never reach the runner; results of requests dropped while their batch runs are
discarded.

With a ``pool`` the batch is concatenated straight into a shared-memory buffer and handed
to ``run_batch`` as :class:`lastmile.runtime.shm.PackedArrays`, which :class:`lastmile.runtime.runner.Runner`
sends to its child without another copy. ``run_batch`` must then not return views of its
inputs (the buffer is reused as soon as it returns).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Awaitable, Callable

import numpy as np

from lastmile.runtime.errors import (
    BatchTooLarge,
    InferenceError,
    InvalidBatch,
    ModelUnavailable,
    QueueFull,
    RequestTimeout,
)
from lastmile.runtime.shm import Buffer, BufferPool, PackedArrays, plan_layout, views

RunBatch = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]

QUEUED, RUNNING, DROPPED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """How one request was served: which batch, how many rows it had, time queued (arrival
    to batch start) and the batch's compute time (``run_batch``: IPC included and, for a
    batch sent ahead, its wait behind the runner's current one)."""

    batch_id: int
    batch_size: int
    queue_s: float
    compute_s: float
    requests: int = 1
    input_s: float = 0.0  # of compute_s: copying the batch's inputs into its buffer (Triton's compute_input)


class _Request:
    __slots__ = ("inputs", "rows", "fut", "enqueued", "deadline", "state", "group", "task", "interrupted")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, fut: asyncio.Future, enqueued: float, group: "_Group") -> None:
        self.inputs = inputs
        self.rows = rows
        self.fut = fut
        self.enqueued = enqueued
        self.deadline = math.inf
        self.state = QUEUED
        self.group = group
        self.task: asyncio.Task | None = None  # set while the request's own task runs its batch
        self.interrupted = False


class _Group:
    """Queued requests of one signature."""

    __slots__ = ("key", "queue", "rows")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.queue: deque[_Request] = deque()
        self.rows = 0

    def head(self) -> _Request | None:
        q = self.queue
        while q and q[0].state != QUEUED:
            q.popleft()
        return q[0] if q else None


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: got {value!r}; must be an integer >= 1")
    return value


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{key}: got {value!r}; must be a finite number >= 0")
    return float(value)


def _positive(key: str, value: Any) -> float:
    value = _non_negative(key, value)
    if value == 0:
        raise ValueError(f"{key}: got 0; must be > 0")
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "max_batch_size": _positive_int,
    "max_delay_ms": _non_negative,
    "max_queue": _positive_int,
    "timeout_s": _positive,
    "concurrency": _positive_int,
}


@dataclass(slots=True)
class BatchCounts:
    """What a batcher has done since it started (the model's ``batching`` figures)."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    rejected: int = 0  # refused before queueing: queue full, or more rows than max_batch_size
    timeouts: int = 0
    cancelled: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        out["avg_batch_size"] = self.rows / self.batches if self.batches else 0.0
        out["avg_requests_per_batch"] = self.requests / self.batches if self.batches else 0.0
        return out


class Batcher:
    """Dynamic batching in front of ``run_batch`` (see the module docstring)."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        timeout_s: float,
        concurrency: int = 1,
        pool: BufferPool | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.pool = pool
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.max_delay_ms = _non_negative("max_delay_ms", max_delay_ms)
        self.max_queue = _positive_int("max_queue", max_queue)
        self.timeout_s = _positive("timeout_s", timeout_s)
        self.concurrency = _positive_int("concurrency", concurrency)
        self._delay_s = self.max_delay_ms / 1000.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[tuple, _Group] = {}
        self._queued = 0
        self._queued_rows = 0
        self._in_flight = 0
        self._running: set[_Request] = set()
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # Deadlines: one deque per timeout value, in arrival order, so each is sorted and a
        # single timer (for the earliest head) serves every request - no heap of per-request
        # timers. Finished requests are skipped lazily and compacted away.
        self._deadlines: dict[float, deque[_Request]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._closed: str | None = None
        self._ids = itertools.count(1)
        self.counts = BatchCounts()
        self._ema_compute_s: float | None = None
        # Requests answered within the last ``max_delay_ms`` whose clients have not sent
        # another one yet (see the module doc), and when the last batch was answered.
        self._owed = 0
        self._answered_at = -math.inf

    # --- the caller's side ------------------------------------------------------------------

    async def submit(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], BatchInfo]:
        """Queue one request and wait for its rows of the batch's outputs."""
        if self._closed is not None:
            raise ModelUnavailable(self._closed)
        rows, key = _describe(inputs)
        if rows > self.max_batch_size:
            self.counts.rejected += 1
            raise BatchTooLarge(rows, self.max_batch_size)
        if self._queued >= self.max_queue:
            self.counts.rejected += 1
            raise QueueFull(self._queued, self.max_queue, self.retry_after_s())
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        now = loop.time()
        req = _Request(inputs, rows, loop.create_future(), now, group)
        self._track_deadline(req, now)
        group.queue.append(req)
        group.rows += rows
        self._queued += 1
        self._queued_rows += rows
        if self._owed:
            self._owed -= 1
        if self._queued == 1 and self._in_flight < self.concurrency and (rows >= self.max_batch_size or not self._expecting(now)):
            # Alone, due now and a runner is free: this request's own task runs its batch (no
            # batch task, no extra event-loop turn to start it and another to hand the result
            # back) - what sets the latency of a lightly loaded server.
            req.task = task = asyncio.current_task()
            batch = self._cut(group)
            try:
                await self._run(next(self._ids), batch)
            except asyncio.CancelledError:
                if req.interrupted and task is not None and task.uncancel() == 0:
                    return req.fut.result()  # timed out or closed: raises what _fail set
                if req.fut.done() and not req.fut.cancelled():
                    req.fut.exception()  # retrieved: the caller's cancellation wins
                self.counts.cancelled += 1
                raise
            finally:
                req.task = None
            return req.fut.result()
        self._kick()
        try:
            return await req.fut
        except asyncio.CancelledError:
            if req.state == QUEUED:
                self._unqueue(req)
            self.counts.cancelled += 1
            raise

    def retry_after_s(self) -> float:
        """Seconds until the queue has probably drained a batch's worth: queued rows over
        throughput (recent batch compute time, ``concurrency`` batches at once)."""
        per_batch = self._ema_compute_s if self._ema_compute_s is not None else max(self._delay_s, 0.01)
        batches_ahead = max(1, math.ceil(self._queued_rows / self.max_batch_size))
        return max(0.001, batches_ahead * per_batch / self.concurrency)

    # --- live tuning ------------------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change ``max_batch_size``, ``max_delay_ms``, ``max_queue``, ``timeout_s`` or
        ``concurrency`` live. A smaller ``max_batch_size`` fails queued requests that no longer
        fit with :class:`BatchTooLarge`; a new ``timeout_s`` applies to new requests."""
        clean = {}
        for key, value in changes.items():
            check = _CHECKS.get(key)
            if check is None:
                raise ValueError(f"{key}: not a batcher setting; known: {', '.join(_CHECKS)}")
            clean[key] = check(key, value)
        for key, value in clean.items():
            setattr(self, key, value)
        self._delay_s = self.max_delay_ms / 1000.0
        if "max_batch_size" in clean:
            for group in list(self._groups.values()):
                for req in list(group.queue):
                    if req.state == QUEUED and req.rows > self.max_batch_size:
                        self._unqueue(req)
                        self.counts.rejected += 1
                        req.fut.set_exception(BatchTooLarge(req.rows, self.max_batch_size))
        if self._loop is not None:
            # New delay: the armed timer may now be too late (or too early - harmless).
            self._cancel_timer()
            self._kick()

    # --- closing ----------------------------------------------------------------------------

    async def close(self, reason: str) -> None:
        """Fail every queued and running request with :class:`ModelUnavailable` (``reason``)
        and refuse new ones. Batches already at a runner finish there; their results are
        dropped."""
        if self._closed is not None:
            return
        self._closed = reason
        self._cancel_timer()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._deadlines.clear()
        for group in list(self._groups.values()):
            for req in list(group.queue):
                if req.state == QUEUED:
                    self._unqueue(req)
                    if not req.fut.done():
                        req.fut.set_exception(ModelUnavailable(reason))
        self._groups.clear()
        for req in list(self._running):
            self._fail(req, ModelUnavailable(reason))

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # --- reporting --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The model's ``batching`` figures: queue now, counts so far, the settings in force."""
        now = {"queue_depth": self._queued, "queued_rows": self._queued_rows, "in_flight": self._in_flight,
               "avg_compute_s": self._ema_compute_s, "groups": len(self._groups), "closed": self._closed is not None}
        settings = {key: getattr(self, key) for key in ("max_batch_size", "max_delay_ms", "max_queue", "timeout_s", "concurrency")}
        return {**now, **self.counts.as_dict(), **settings}

    # --- scheduling -------------------------------------------------------------------------

    def _unqueue(self, req: _Request) -> None:
        req.state = DROPPED
        req.group.rows -= req.rows
        self._queued -= 1
        self._queued_rows -= req.rows

    def _track_deadline(self, req: _Request, now: float) -> None:
        timeout = self.timeout_s
        req.deadline = deadline = now + timeout
        dq = self._deadlines.get(timeout)
        if dq is None:
            dq = self._deadlines[timeout] = deque()
        elif len(dq) > 1024 and len(dq) > 4 * (self._queued + len(self._running) + 1):
            live = deque(r for r in dq if not r.fut.done())
            dq.clear()
            dq.extend(live)
        dq.append(req)
        if deadline < self._expiry_at:
            self._arm_expiry(deadline)

    def _arm_expiry(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        assert self._loop is not None
        self._expiry = self._loop.call_at(when, self._on_expiry)
        self._expiry_at = when

    def _on_expiry(self) -> None:
        """Fail every request past its deadline; re-arm for the earliest one left."""
        self._expiry = None
        self._expiry_at = math.inf
        assert self._loop is not None
        now = self._loop.time()
        earliest = math.inf
        for timeout, dq in list(self._deadlines.items()):
            while dq:
                req = dq[0]
                if req.fut.done():
                    dq.popleft()
                elif req.deadline <= now:
                    dq.popleft()
                    self._expire(req, timeout)
                else:
                    earliest = min(earliest, req.deadline)
                    break
            if not dq and timeout != self.timeout_s:
                del self._deadlines[timeout]
        if earliest < math.inf:
            self._arm_expiry(earliest)

    def _expire(self, req: _Request, timeout_s: float) -> None:
        if req.fut.done():
            return
        if req.state == QUEUED:
            self._unqueue(req)
            stage = "queued"
        else:
            stage = "running"
        self.counts.timeouts += 1
        self._fail(req, RequestTimeout(timeout_s, stage))

    @staticmethod
    def _fail(req: _Request, exc: Exception) -> None:
        """Fail a request now; one whose own task runs its batch is interrupted, so it does
        not wait for the runner (which finishes the batch regardless)."""
        if req.fut.done():
            return
        req.fut.set_exception(exc)
        if req.task is not None and not req.interrupted:
            req.interrupted = True
            req.task.cancel()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._kick()

    def _expecting(self, now: float) -> bool:
        """Whether clients of a just-answered batch are probably about to send more rows
        (then a partial batch waits for them, until ``max_delay_ms`` after the answer)."""
        return self._owed > 0 and now < self._answered_at + self._delay_s

    def _kick(self) -> None:
        """Cut and launch a batch whenever a runner is free (a partial one waits only for
        clients about to return, see :meth:`_expecting`), and full batches ahead of busy
        runners; otherwise arm one timer for when the wait for returning clients ends."""
        loop = self._loop
        if loop is None or self._closed is not None:
            return
        while self._queued:
            if self._in_flight < self.concurrency:
                full_only = False
            elif self._in_flight < 2 * self.concurrency and (self.pool is None or self.pool.fits_twice()):
                full_only = True  # runners busy: only a full batch goes ahead of them
            else:
                return
            now = loop.time()
            partial_ok = not full_only and not self._expecting(now)
            best: _Group | None = None
            best_t = math.inf
            wake = math.inf
            for key, group in list(self._groups.items()):
                head = group.head()
                if head is None:
                    del self._groups[key]
                    continue
                if group.rows >= self.max_batch_size or partial_ok:
                    if head.enqueued < best_t:
                        best, best_t = group, head.enqueued
                else:
                    wake = self._answered_at + self._delay_s
            if best is None:
                if wake < self._timer_at and not full_only:  # a finishing batch kicks again
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = loop.call_at(wake, self._on_timer)
                    self._timer_at = wake
                return
            self._launch(best)

    def _launch(self, group: _Group) -> None:
        batch = self._cut(group)
        assert self._loop is not None
        task = self._loop.create_task(self._run(next(self._ids), batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cut(self, group: _Group) -> list[_Request]:
        """Take the group's next batch off the queue; it counts as in flight from here."""
        batch: list[_Request] = []
        rows = 0
        q = group.queue
        limit = self.max_batch_size
        while q:
            req = q[0]
            if req.state != QUEUED:
                q.popleft()
                continue
            if rows + req.rows > limit:
                break
            q.popleft()
            req.state = RUNNING
            batch.append(req)
            rows += req.rows
        group.rows -= rows
        self._queued -= len(batch)
        self._queued_rows -= rows
        if not q:
            self._groups.pop(group.key, None)
        self._in_flight += 1
        self._running.update(batch)
        return batch

    async def _run(self, batch_id: int, batch: list[_Request]) -> None:
        loop = self._loop
        assert loop is not None
        buf = None
        try:
            live = [r for r in batch if not r.fut.done()]  # dropped since the cut: rows stay out
            if not live:
                return
            rows = sum(r.rows for r in live)
            started = loop.time()
            try:
                inputs, buf = self._concat(live, rows)
                input_s = loop.time() - started
                outputs = await self._run_batch(inputs)
                del inputs
                _check_outputs(outputs, rows)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets it
                self.counts.errors += 1
                if isinstance(exc, InferenceError) and len(live) > 1:
                    # The model raised on this batch: one bad request must not fail its
                    # batch-mates, so each runs alone once and only the bad ones fail.
                    for r in live:
                        await self._run_alone(batch_id, r)
                    return
                for r in live:
                    if not r.fut.done():
                        r.fut.set_exception(exc)
                return
            compute_s = loop.time() - started
            self.counts.batches += 1
            self.counts.requests += len(live)
            self.counts.rows += rows
            ema = self._ema_compute_s
            self._ema_compute_s = compute_s if ema is None else ema + 0.2 * (compute_s - ema)
            self._owed = len(live) if loop.time() >= self._answered_at + self._delay_s else self._owed + len(live)
            self._answered_at = loop.time()
            offset = 0
            n = len(live)
            for r in live:
                if not r.fut.done():
                    end = offset + r.rows
                    part = {name: arr[offset:end] for name, arr in outputs.items()}
                    r.fut.set_result((part, BatchInfo(batch_id, rows, started - r.enqueued, compute_s, n, input_s)))
                offset += r.rows
        finally:
            if buf is not None and self.pool is not None:
                self.pool.release(buf)
            for r in batch:
                r.inputs = None  # type: ignore[assignment]  # the deadline deque may outlive it
            self._running.difference_update(batch)
            self._in_flight -= 1
            self._kick()

    async def _run_alone(self, batch_id: int, req: _Request) -> None:
        if req.fut.done():
            return
        assert self._loop is not None
        started = self._loop.time()
        try:
            outputs = await self._run_batch(req.inputs)
            _check_outputs(outputs, req.rows)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            if not req.fut.done():
                req.fut.set_exception(exc)
            return
        if not req.fut.done():
            req.fut.set_result((outputs, BatchInfo(batch_id, req.rows, started - req.enqueued, self._loop.time() - started, 1)))

    def _concat(self, batch: list[_Request], rows: int) -> tuple[dict[str, np.ndarray], Buffer | None]:
        first = batch[0].inputs
        if self.pool is None:
            if len(batch) == 1:
                return first, None
            return {name: np.concatenate([r.inputs[name] for r in batch], axis=0) for name in first}, None
        layout, total = plan_layout((name, arr.dtype, (rows,) + arr.shape[1:]) for name, arr in first.items())
        buf = self.pool.acquire(total)
        try:
            arrays = views(buf.mm, layout)
            for name, dest in arrays.items():
                if len(batch) == 1:
                    dest[...] = first[name]
                else:
                    np.concatenate([r.inputs[name] for r in batch], axis=0, out=dest)
        except BaseException:
            self.pool.release(buf)
            raise
        return PackedArrays(buf, layout, arrays), buf


def _describe(inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple]:
    """Rows (dim 0, equal across inputs) and the batching signature of one request."""
    if not inputs or not (type(inputs) is dict or isinstance(inputs, Mapping)):
        raise InvalidBatch("", "a request needs at least one input tensor")
    rows = -1
    first = ""
    key = []
    for name, arr in inputs.items():
        if not isinstance(arr, np.ndarray):
            raise InvalidBatch(name, f"expected a numpy array, got {type(arr).__name__}")
        if arr.ndim == 0:
            raise InvalidBatch(name, "a scalar has no batch dimension (dim 0)")
        if rows < 0:
            rows, first = arr.shape[0], name
        elif arr.shape[0] != rows:
            raise InvalidBatch(name, f"has {arr.shape[0]} rows (dim 0) but {first!r} has {rows}; all inputs of a request need the same batch size")
        key.append((name, arr.dtype.str, arr.shape[1:]))
    if len(key) > 1:
        key.sort()
    return rows, tuple(key)


def _check_outputs(outputs: Any, rows: int) -> None:
    if type(outputs) is not dict and not isinstance(outputs, Mapping):
        raise InferenceError(f"run_batch returned {type(outputs).__name__}, expected a dict of arrays")
    for name, arr in outputs.items():
        if not isinstance(arr, np.ndarray) or arr.ndim == 0 or arr.shape[0] != rows:
            shape = getattr(arr, "shape", None)
            raise InferenceError(f"output {name!r} has shape {shape} for a batch of {rows} rows; outputs must keep the batch dimension")
