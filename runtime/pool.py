"""The runners of one model and the queue of their free batch slots.

Why a pool of its own: the batcher hands a batch to :meth:`RunnerPool.run` and the pool picks
a runner, so the infer path goes one way - route -> data plane -> batcher -> pool -> runner -
with no call back into the model manager. The manager only fills the pool (:meth:`add`),
empties it (:meth:`stop`) and says when it must refuse work (:meth:`refuse`, while a runner
restarts), which fails queued batches at once (503) instead of leaving them to time out.

A runner has :data:`lastmile.runtime.runner.PIPELINE_DEPTH` entries in the idle queue, one per
batch it may hold, so a free runner is taken before a busy one's pipeline slot only in queue
order (runners go back to the end of the queue when a batch finishes).

The pool is a read-only sequence of its runners (``len``, iteration, indexing) for the code
that reports on them or samples their memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterator, Sequence, overload

import numpy as np

from lastmile.runtime.errors import ModelUnavailable
from lastmile.runtime.runner import PIPELINE_DEPTH, Runner

logger = logging.getLogger("lastmile.pool")


class RunnerPool(Sequence[Runner]):
    """The runners of model ``name`` (see the module docstring). All on one event loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._runners: list[Runner] = []
        self._idle: asyncio.Queue[Runner] = asyncio.Queue()
        self._refusing: str | None = None
        self._slot_limit: int | None = None  # a generation model's lowered sequence limit, for runners added later

    # --- the sequence view ------------------------------------------------------------------

    @overload
    def __getitem__(self, index: int) -> Runner: ...

    @overload
    def __getitem__(self, index: slice) -> list[Runner]: ...

    def __getitem__(self, index: int | slice) -> Runner | list[Runner]:
        return self._runners[index]

    def __len__(self) -> int:
        return len(self._runners)

    def __iter__(self) -> Iterator[Runner]:
        return iter(list(self._runners))  # a copy: awaiting callers may see the list change

    def __repr__(self) -> str:
        return f"RunnerPool({self.name!r}, {self._runners!r})"

    # --- filling and emptying -----------------------------------------------------------------

    def add(self, runner: Runner) -> None:
        """A started runner joins: its batch slots go to the idle queue."""
        self._runners.append(runner)
        for _ in range(PIPELINE_DEPTH):
            self._idle.put_nowait(runner)
        if self._slot_limit is not None:
            self._apply_slots(runner)

    async def stop(self) -> None:
        """Stop every runner (their ``on_exit`` hooks detached first: this is no crash) and
        forget them; batches waiting for a slot keep waiting for the next :meth:`add`."""
        runners, self._runners = self._runners, []
        while not self._idle.empty():
            self._idle.get_nowait()
        for runner in runners:
            runner.on_exit = None
        await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)

    def refuse(self, reason: str) -> None:
        """Fail batches with :class:`ModelUnavailable` (``reason``) until :meth:`accept`."""
        self._refusing = reason

    def accept(self) -> None:
        self._refusing = None

    # --- serving ----------------------------------------------------------------------------

    async def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on the next free runner (the batcher's ``run_batch``)."""
        if self._refusing is not None:
            raise ModelUnavailable(self._refusing)
        runner = await self._idle.get()
        try:
            return await runner.run(inputs)
        finally:
            if runner.alive:
                self._idle.put_nowait(runner)

    async def shrink(self, timeout_s: float = 5.0) -> None:
        """Ask every runner to give cached memory back and drop unlinked segments. A busy or
        dead runner is skipped after ``timeout_s``: shrinking is best effort."""

        async def one(runner: Runner) -> None:
            try:
                await asyncio.wait_for(runner.shrink(), timeout_s)
            except Exception as exc:  # noqa: BLE001 - the next mitigation step follows
                logger.debug("shrink of %r skipped: %s", runner, exc)

        await asyncio.gather(*(one(r) for r in self._runners))

    def set_slots(self, limit: int | None) -> None:
        """A generation model's sequence limit on every runner, now and on runners that join
        later (a restarted runner keeps the ladder's step); None: the configured max_num_seqs."""
        self._slot_limit = limit
        for runner in self._runners:
            self._apply_slots(runner)

    def _apply_slots(self, runner: Runner) -> None:
        set_slots = getattr(runner, "set_slots", None)  # generation runners only
        if set_slots is not None:
            set_slots(self._slot_limit or 1 << 30)  # the scheduler clamps to max_num_seqs

    def describe(self) -> list[dict[str, Any]]:
        """One row per runner, for ``GET /lm/v1/models``."""
        return [{"instance": i, "pid": r.pid, "alive": r.alive, "batches": r.batches, "backend_s": round(r.backend_s, 6)}
                for i, r in enumerate(self._runners)]
