"""Exceptions shared by the runner, the batcher and the buffer pool.

The runtime knows nothing of HTTP; the daemon maps these to status codes. The intended
mapping is written on each class so that every room reads the same table:

=====================  ======================================
exception              daemon answer
=====================  ======================================
``BatchTooLarge``      400 (the request can never be served)
``InvalidBatch``       400
``QueueFull``          503 + ``Retry-After: ceil(retry_after_s)``
``RequestTimeout``     504
``ModelUnavailable``   503 (unloading, restarting, closed)
``RunnerDied``         503 (the model restarts)
``InferenceError``     500 (the backend raised on this batch)
``LoadError``          load request fails with the message
``ShmError``           500 / load refused (shared memory exhausted)
=====================  ======================================
"""

from __future__ import annotations

import signal


class LastmileRuntimeError(Exception):
    """Base of everything the runtime raises on purpose; ``str(exc)`` is operator-readable."""


def describe_exit(code: int | None) -> str:
    """How a process ended, in the words an operator searches for: ``SIGKILL`` for -9 (what
    the OOM killer and ``kill -9`` leave), ``signal N`` for an unnamed signal, ``exit code N``
    otherwise."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# --- loading -------------------------------------------------------------------------------


class LoadError(LastmileRuntimeError):
    """A runner could not load its model. The message is the backend's own error text (for
    example the ONNX Runtime or DeepSpeed message), never a traceback dump."""


class LoadTimeout(LoadError):
    """Loading took longer than allowed; the runner process was killed."""


# --- serving -------------------------------------------------------------------------------


class RunnerDied(LastmileRuntimeError):
    """The runner process is gone (crash, OOM kill, ``kill -9``). ``exitcode`` is the
    multiprocessing exit code (negative: killed by that signal)."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class InferenceError(LastmileRuntimeError):
    """The backend raised while running one batch; the runner is still up."""


class ModelUnavailable(LastmileRuntimeError):
    """The model cannot take requests now (unloading, restarting, closed batcher)."""


class BatchTooLarge(LastmileRuntimeError):
    """One request has more rows than the model's ``max_batch_size``: it can never run."""

    def __init__(self, rows: int, max_batch_size: int) -> None:
        super().__init__(
            f"request has {rows} rows (dim 0) but this model's max_batch_size is {max_batch_size}; "
            "split the request or raise max_batch_size"
        )
        self.rows = rows
        self.max_batch_size = max_batch_size


class InvalidBatch(LastmileRuntimeError, ValueError):
    """The inputs of one request cannot be batched (no inputs, a scalar, dim 0 disagreeing
    between inputs). ``key`` names the offending input."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class QueueFull(LastmileRuntimeError):
    """The model's queue holds ``max_queue`` requests already. ``retry_after_s`` estimates
    when there will be room (queued work / throughput)."""

    def __init__(self, depth: int, max_queue: int, retry_after_s: float) -> None:
        super().__init__(
            f"queue full: {depth} requests waiting (max_queue {max_queue}); retry in about {retry_after_s:.3g} s"
        )
        self.depth = depth
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s


class RequestTimeout(LastmileRuntimeError):
    """The request was not answered within ``timeout_s`` (queueing and compute together)."""

    def __init__(self, timeout_s: float, stage: str) -> None:
        super().__init__(f"request timed out after {timeout_s:g} s ({stage})")
        self.timeout_s = timeout_s
        self.stage = stage  # "queued" | "running"


# --- shared memory -------------------------------------------------------------------------


class ShmError(LastmileRuntimeError):
    """A shared-memory segment could not be created or mapped (``/dev/shm`` full, closed
    pool); the message carries the sizes involved."""
