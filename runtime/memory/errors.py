"""The two ways memory says no: a load that does not fit (507) and a request refused while a
model is under memory pressure (503 + ``Retry-After``). The HTTP mapping lives in
``lastmile.appliance.server.http``."""

from __future__ import annotations

from typing import Any

from lastmile.runtime.errors import LastmileRuntimeError, LoadError, ModelUnavailable

SHED_RETRY_AFTER_S = 2.0


class InsufficientMemory(LastmileRuntimeError):
    """A load does not fit (HTTP 507). ``detail`` holds the numbers and the options that would
    fit: ``{model, device, needed_bytes, free_bytes, limit_bytes, reason, estimate, options}``."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.detail = detail


class OverLimitAtReady(InsufficientMemory, LoadError):
    """A runner that finished loading already holds more than its model may idle at (the low
    watermark of its ``memory_limit_mb``): the ladder would act on it with no traffic. A load
    answers 507 with the options; a restart treats it as any failed start."""


class MemoryPressure(ModelUnavailable):
    """The model is shedding load (ladder step 3) or its runner's memory cap refused a batch:
    503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float = SHED_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
