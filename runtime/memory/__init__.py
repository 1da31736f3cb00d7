"""The memory room: budgets per device, estimates and admission of loads, accounting of what
each runner really uses, the mitigation ladder, and the runner's hard cap.

===================  ========================================================================
module               one job
===================  ========================================================================
``units``            MiB <-> bytes (the only conversion) and MiB/GiB in human text
``errors``           507 (:class:`InsufficientMemory`) and 503 (:class:`MemoryPressure`)
``procfs``           the one reader of ``/proc`` memory figures (USS, Anonymous, PSS, RSS)
``policy``           the ``[memory]`` keys, defaults and cross-key rules
``estimate``         what a load will need, per part and device, read from the artifact
``footprints``       what a load really used, per artifact content hash, for the next one
``budget``           what each device may hold
``admission``        fits or not, the options, ``plan``/``evict_idle``
``sampler``          reads usage at a pace that follows activity
``ladder``           shrink -> lower_batch (fewer_slots for generation) -> shed -> restart, and recovery
``governor``         :class:`MemoryGovernor`: the one object the manager and routes use
``protocol``         what the governor needs of the model manager (no import of it)
``cap``              the hard cap inside a runner (``RLIMIT_AS``, allocator tuning)
``measure``          ``python -m lastmile.runtime.memory.measure``: peak, unload, fusion
``measure_overhead`` ``python -m lastmile.runtime.memory.measure_overhead``: runner costs
===================  ========================================================================

Names are imported lazily: the runner and the forkserver import ``cap`` (and the forkserver
must set its allocator up before NumPy starts threads), so this package's import pulls in
nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MemoryGovernor": "governor", "POOL_IDLE_SHARE": "governor",
    "InsufficientMemory": "errors", "MemoryPressure": "errors", "OverLimitAtReady": "errors",
    "ModelMemory": "records", "DEFAULTS": "policy", "PLANS": "policy", "check_memory_config": "policy",
    "read_proc_memory": "procfs", "footprint": "procfs", "FootprintWatch": "procfs", "pss": "procfs",
    "forkserver_pids": "procfs", "Estimate": "estimate", "budget_device": "estimate", "MiB": "units",
    "RECOVER_AFTER_S": "ladder", "MEMORY_RESTART_BACKOFF_S": "ladder", "SHED_RETRY_AFTER_S": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
