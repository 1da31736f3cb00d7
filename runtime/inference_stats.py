"""Per-model inference counters in the shape of Triton's statistics extension
(``GET /v2/models/{name}/stats``), plus the last request error an operator wants to see.

Why a module of its own: the manager records one success or failure per request and nothing
else; the route and the operator views read the same numbers. Durations are cumulative
nanoseconds with a count, as Triton reports them, so a client divides ``ns`` by ``count`` for
a mean and differences two reads for a rate.

What each duration measures in Lastmile (a request's path: queue, batch assembly into shared
memory, one runner round trip, the request's slice of the outputs):

- ``success`` / ``fail``: the whole time in the model manager (queue to result), per request;
- ``queue``: arrival at the batcher until its batch started;
- ``compute_input``: copying the batch's inputs into the batch buffer (shared memory);
- ``compute_infer``: the runner round trip (IPC and the backend's forward call);
- ``compute_output``: from the runner's answer until this request's outputs were handed back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

LAST_ERROR_CHARS = 500  # an error message kept for the operator, not a log


@dataclass
class Duration:
    """A count and the nanoseconds summed over it (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class InferenceCounters:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows served (a request of 4 rows counts 4, as in Triton)
    batch_ids: int = 0  # batches seen (execution_count)
    last_inference_ms: int = 0  # epoch milliseconds of the last success
    last_error: dict[str, Any] | None = None  # {"message", "time", "type"}
    _last_batch: int | None = None

    def succeeded(self, rows: int, total_s: float, info: Any) -> None:
        """One request served; ``info`` is the batcher's BatchInfo. On every request's path:
        plain attribute arithmetic, no calls beyond ``time.time``."""
        queue_s, input_s, compute_s = info.queue_s, info.input_s, info.compute_s
        self.success.count += 1
        self.success.ns += int(total_s * 1e9)
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.queue.count += 1
        self.queue.ns += int(queue_s * 1e9)
        self.compute_input.count += 1
        self.compute_input.ns += int(input_s * 1e9)
        self.compute_infer.count += 1
        self.compute_infer.ns += int((compute_s - input_s) * 1e9)
        self.compute_output.count += 1
        rest = total_s - queue_s - compute_s
        self.compute_output.ns += int(rest * 1e9) if rest > 0 else 0
        if info.batch_id != self._last_batch:  # requests of one batch finish together
            self._last_batch = info.batch_id
            self.batch_ids += 1

    def failed(self, exc: BaseException, total_s: float) -> None:
        self.fail.add(total_s)
        message = str(exc) or type(exc).__name__
        self.last_error = {"message": message[:LAST_ERROR_CHARS], "type": type(exc).__name__, "time": time.time()}

    def triton(self, name: str, version: str = "1") -> dict[str, Any]:
        """One entry of Triton's ``model_stats`` list."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.batch_ids,
            "inference_stats": {
                key: getattr(self, key).as_dict()
                for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
            },
            "batch_stats": [],
        }
