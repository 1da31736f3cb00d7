"""How many intra-op threads a runner uses, and how its idle threads wait.

Measured on the 2-core CI box (busy with other processes; 8-row batches, ``backend.run``
in-process, p50): demo-lm-ds 366 ms with torch's default of 2
threads vs 2.7 ms with 1; demo-mlp-ds 40 ms vs 0.54 ms. The cause is OpenMP's barrier: every
op of the graph is a parallel region that ends only when *all* its threads ran, and with
more runnable threads than cores (the daemon's event loop, the load, other runners) one of
them is always waiting for a time slice. Two fixes, both here:

- ``threads = 0`` ("auto") resolves to the usable cores minus one (at least 1): the daemon's
  event loop needs a core to itself under load, or every request waits behind the model's
  threads. An explicit ``threads`` is kept as given (``lastmile tune`` sweeps it).
  Giving a lone request every core was measured and lost (docs/performance.md): on a
  memory-bound 100 MB MLP one row takes 5.7 ms with 1 thread and 5.5 ms with 2, while under
  64 clients 2 threads served 15% fewer rows/s than 1 (the second thread and the daemon's
  loop share a core). Per-call thread counts or a second session would win ~0.2 ms at most.
- Idle threads sleep instead of spinning: ``OMP_WAIT_POLICY=PASSIVE`` for torch's OpenMP
  (read once when libgomp loads, so it is set before the forkserver imports torch) and
  ``session.intra_op.allow_spinning = 0`` for ONNX Runtime. Spinning wins a few µs on an idle
  machine and loses milliseconds as soon as another process wants the core (demo-lm-ds,
  2 threads: 106 ms -> 4.5 ms p50 with PASSIVE). The ORT-GenAI generation engine is the
  exception (it spins: ``generation/ort_engine.py`` says why).
"""

from __future__ import annotations

import os

__all__ = ["usable_cores", "resolve_threads", "set_thread_env"]


def usable_cores() -> int:
    """Physical cores this process may run on (affinity and cgroup-free count)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    physical = allowed
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: use the affinity
        pass
    return max(1, min(allowed, physical))


def resolve_threads(setting: int) -> int:
    """The intra-op thread count for ``threads = setting`` (0: auto, see the module doc)."""
    if setting and setting > 0:
        return int(setting)
    return max(1, usable_cores() - 1)


def set_thread_env() -> None:
    """Wait policy for OpenMP threads, set before torch is imported (an operator's own
    ``OMP_WAIT_POLICY`` wins)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
