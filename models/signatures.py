"""Reading a model artifact's tensor signature once, away from the daemon's event loop.

Inferring a signature means parsing the artifact: an ONNX protobuf (a 300 MB file takes half
a second and its size in memory) or a torch.export program (imports torch: seconds and
~200 MB that the daemon would keep for life). A listing of the store is something any viewer
may ask for, so that work must neither run on the event loop nor more than once per file.

:class:`SignatureReader` caches results by ``(path, size, mtime)``. ``compute`` does the
reading (the daemon passes one that runs in a forkserver child). Asked from the thread that
runs an asyncio loop, a miss starts the reading in the background and raises
:class:`SignaturePending` at once (a listing shows "being read"; a client asks again);
asked from any other thread (a load, run in an executor) it waits for the result.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from lastmile.models.errors import FormatError, ManifestError
from lastmile.models.spec import TensorSpec

Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[str, ...]]
Compute = Callable[[str, Path], Signature]


class SignaturePending(ManifestError):
    """The signature is being read in the background; ask again shortly (HTTP 503)."""

    retry_after_s = 1.0


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SignatureReader:
    """``reader(fmt, artifact)`` -> ``(inputs, outputs, notes)``, cached per file version.

    At most ``max_entries`` results are kept (oldest dropped first). A file that cannot be read
    (:class:`FormatError`) is remembered too, so listing a corrupt artifact again costs nothing;
    a fixed file has a new size or mtime and is read again.
    """

    def __init__(self, compute: Compute, *, workers: int = 1, max_entries: int = 1024) -> None:
        self.compute = compute
        self.max_entries = max_entries
        self._done: dict[tuple[str, int, int], Signature | FormatError] = {}
        self._running: dict[tuple[str, int, int], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lastmile-signature")
        self.computed = 0  # how many times compute ran (tests and /metrics-minded readers)

    @staticmethod
    def key(artifact: Path) -> tuple[str, int, int]:
        st = os.stat(artifact)
        return (str(artifact), st.st_size, st.st_mtime_ns)

    def __call__(self, fmt: str, artifact: Path) -> Signature:
        key = self.key(artifact)
        with self._lock:
            hit = self._done.get(key)
            if isinstance(hit, FormatError):
                raise hit
            if hit is not None:
                return hit
            future = self._running.get(key)
            if future is None:
                future = self._pool.submit(self._compute, key, fmt, artifact)
                self._running[key] = future
        if _on_event_loop() and not future.done():
            raise SignaturePending(
                artifact.parent, "artifact",
                f"the signature of {artifact.name} is being read in the background; ask again in a moment",
            )
        return future.result()

    def _compute(self, key: tuple[str, int, int], fmt: str, artifact: Path) -> Signature:
        try:
            try:
                result: Signature | FormatError = self.compute(fmt, artifact)
            except FormatError as exc:
                result = exc
            self.computed += 1
            with self._lock:
                while len(self._done) >= self.max_entries:
                    self._done.pop(next(iter(self._done)))
                self._done[key] = result
            if isinstance(result, FormatError):
                raise result
            return result
        finally:
            with self._lock:
                self._running.pop(key, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
