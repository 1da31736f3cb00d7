"""The runner process: load one model, then answer the daemon's requests until told to stop.

Runs in a child of the forkserver (:mod:`lastmile.runtime.forkserver`); the daemon's side is
:class:`lastmile.runtime.runner.Runner`. The messages are :mod:`lastmile.runtime.protocol`'s,
over two one-way pipes; tensors travel in the daemon's shared-memory segments, which this
process only maps (:class:`lastmile.runtime.shm.SegmentCache`).

One request at a time runs to its end. (Generation runners have their own loop,
:mod:`lastmile.runtime.generation.serve`: continuous batching advances every sequence in one
step.)
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from lastmile.models.settings import ModelSettings
from lastmile.models.spec import Manifest
from lastmile.runtime.backends.base import Backend
from lastmile.runtime.memory.cap import HardCap
from lastmile.runtime import protocol as proto
from lastmile.runtime.shm import SegmentCache, layout_of, pack, views

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
MAX_ERROR_CHARS = 4000

#: Builds the backend in the child (default: :func:`lastmile.runtime.backends.create_backend`).
#: Must be picklable by reference (a module-level function or class).
BackendFactory = Callable[[Manifest, ModelSettings], Backend]


def describe_error(exc: BaseException) -> str:
    """The text an operator sees: the backend's own message; the exception type only when
    the message alone would be meaningless. Never a traceback (that goes to stderr/journal)."""
    from lastmile.runtime.backends.base import BackendError

    text = str(exc).strip()
    if not isinstance(exc, BackendError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _setup_process(label: str) -> None:
    """Ignore SIGINT (the daemon owns shutdown), die with the forkserver (which dies with the
    daemon), and show the model's name in ``ps``/``top``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        # The daemon starts runners as daemonic processes (so its own exit terminates them);
        # inside, a backend may still need worker processes (torch.compile's pool):
        # multiprocessing refuses children of a daemonic process unless the flag is cleared.
        multiprocessing.current_process().daemon = False
    except (AssertionError, ValueError):
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"lm:{label}".encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: pipe EOF still ends the loop
        pass


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def warmup_inputs(manifest: Manifest, rows: int) -> dict[str, np.ndarray] | None:
    """Zero inputs of ``rows`` rows from the manifest's specs (variable dims set to 1), or
    None when the manifest does not describe its inputs."""
    if not manifest.inputs:
        return None
    out = {}
    for spec in manifest.inputs:
        shape = (rows,) + tuple(1 if d < 0 else d for d in spec.shape[1:])
        out[spec.name] = np.zeros(shape, dtype=spec.numpy_dtype)
    return out


def _as_arrays(outputs: Any) -> dict[str, np.ndarray]:
    if not isinstance(outputs, dict):
        raise TypeError(f"backend returned {type(outputs).__name__}, expected dict of arrays")
    clean = {}
    for name, value in outputs.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        clean[str(name)] = arr
    return clean


def main(rx: Connection, tx: Connection, manifest: Manifest, settings: ModelSettings, label: str,
         factory: BackendFactory | None = None) -> None:
    """Process entry point (``multiprocessing`` target). ``rx``/``tx``: the two one-way pipes
    (plain pipes wake the other side faster than a socketpair)."""
    _setup_process(label)
    # Objects inherited from the forkserver (torch, onnxruntime... ~100 MB) stay out of the
    # collector: a full collection writes every object's header, copying each shared page
    # into this process (measured: USS 10 -> 113 MB with no new allocation).
    gc.freeze()
    from lastmile.runtime.memory.cap import tune_allocator

    tune_allocator(bool(settings.memory_limit_mb))  # before the backend starts threads

    def send(msg: proto.Message) -> None:
        tx.send_bytes(proto.encode(msg))

    send(proto.Phase(proto.NO_SEQ, "loading", {"pid": os.getpid()}))
    started = time.perf_counter()
    try:
        if factory is None:
            from lastmile.runtime.backends import create_backend

            factory = create_backend
        backend = factory(manifest, settings)
    except BaseException as exc:  # noqa: BLE001 - everything becomes the load error text
        traceback.print_exc(file=sys.stderr)
        send(proto.LoadFailed(proto.NO_SEQ, describe_error(exc)))
        tx.close()
        return
    load_s = time.perf_counter() - started

    send(proto.Phase(proto.NO_SEQ, "warming", {"load_s": round(load_s, 4)}))
    warm_started = time.perf_counter()
    rows_tried = []
    try:
        for rows in sorted({1, int(settings.max_batch_size)}):
            inputs = warmup_inputs(manifest, rows)
            if inputs is None:
                break
            rows_tried.append(rows)
            _as_arrays(backend.run(inputs))
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        send(proto.LoadFailed(proto.NO_SEQ, f"warm-up batch of {rows_tried[-1]} rows failed: {describe_error(exc)}"))
        try:
            backend.close()
        finally:
            tx.close()
        return
    warmup_s = time.perf_counter() - warm_started
    # the hard cap, before "ready": this process owns its state, the backend knows nothing of it
    cap = HardCap.after_warmup(settings.memory_limit_mb, getattr(backend, "_kind", "cpu"))
    try:
        info = dict(backend.info())
    except Exception as exc:  # noqa: BLE001
        info = {"info_error": describe_error(exc)}
    info["hard_cap"] = cap.as_dict()
    info.update(load_s=round(load_s, 4), warmup_s=round(warmup_s, 4), warmup_rows=rows_tried)
    send(proto.Ready(proto.NO_SEQ, info))
    server = _Server(rx, tx, backend, cap)
    try:
        server.serve()
    finally:
        try:
            backend.close()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)


class _PipeClosed(Exception):
    """The daemon's end of a pipe is gone: stop serving."""


class _Server:
    """Answers requests until :class:`Stop` or the daemon's end of the pipe closes."""

    def __init__(self, rx: Connection, tx: Connection, backend: Backend, cap: HardCap) -> None:
        self._recv_bytes = rx.recv_bytes
        self._send_bytes = tx.send_bytes
        self.backend = backend
        self.cap = cap  # the memory cap this process owns (redrawn at serve start and each shrink)
        self.segments = SegmentCache()
        self.backlog: deque[proto.ToRunner] = deque()  # messages that arrived while a batch waited for an OutBuffer
        self._handlers: dict[type, Callable[[Any], bool]] = {
            proto.Run: self._run,
            proto.MemoryQuery: self._memory,
            proto.Shrink: self._shrink,
            proto.Stop: self._stop,
            proto.OutBuffer: lambda msg: False,  # late answer for a batch that already failed
        }

    def send(self, msg: proto.Message) -> None:
        self._send_bytes(proto.encode(msg))  # plain pickle: several µs less than Connection.send

    def _read(self) -> proto.ToRunner:
        try:
            return proto.decode(self._recv_bytes())  # type: ignore[return-value]
        except (EOFError, OSError):
            raise _PipeClosed from None

    def serve(self) -> None:
        self.cap.recap()  # the memory cap, from what is mapped now that serving starts
        handlers = self._handlers
        try:
            while True:
                msg = self.backlog.popleft() if self.backlog else self._read()
                handler = handlers.get(type(msg))
                if handler is None:
                    self.send(proto.Failed(msg.seq, f"unknown runner message {type(msg).__name__}"))
                elif handler(msg):
                    return
        except (_PipeClosed, BrokenPipeError, ConnectionResetError):
            return  # the daemon is gone or closed our pipe: nothing left to answer

    # --- one batch ------------------------------------------------------------------------

    def _run(self, msg: proto.Run) -> bool:
        seq = msg.seq
        segments = self.segments
        if msg.unmapped is None or msg.unmapped:
            segments.drop(msg.unmapped)
        out_name = msg.out_segment
        try:
            inputs = views(segments.get(msg.in_segment), msg.in_layout, readonly=True)
            t0 = time.perf_counter()
            outputs = _as_arrays(self.backend.run(inputs))
            backend_s = time.perf_counter() - t0
            del inputs
            layout, total = layout_of(outputs)
            if total > msg.out_capacity:
                out_name = self._bigger_buffer(seq, total)
            pack(outputs, segments.get(out_name), layout)
            del outputs
        except _PipeClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - reported for this batch; keep serving
            self.send(proto.Failed(seq, describe_error(exc)))
            return False
        self.send(proto.Done(seq, layout, backend_s))
        return False

    def _bigger_buffer(self, seq: int, nbytes: int) -> str:
        """Ask for an output buffer of ``nbytes`` and wait for it; what else arrives meanwhile
        waits in the backlog."""
        self.send(proto.Need(seq, nbytes))
        while True:
            reply = self._read()
            if isinstance(reply, proto.OutBuffer) and reply.seq == seq:
                if reply.segment is None:
                    raise RuntimeError(f"no output buffer of {nbytes} bytes: {reply.error}")
                return reply.segment
            self.backlog.append(reply)

    # --- control --------------------------------------------------------------------------

    def _memory(self, msg: proto.MemoryQuery) -> bool:
        try:
            self.send(proto.Done(msg.seq, dict(self.backend.memory())))
        except Exception as exc:  # noqa: BLE001
            self.send(proto.Failed(msg.seq, describe_error(exc)))
        return False

    def _shrink(self, msg: proto.Shrink) -> bool:
        try:
            self.segments.drop(msg.unmapped)
            self.backend.shrink()
            gc.collect()
            self.cap.recap()  # before the trim: its holes refill without new address space
            _malloc_trim()
            self.send(proto.Done(msg.seq, None))
        except Exception as exc:  # noqa: BLE001
            self.send(proto.Failed(msg.seq, describe_error(exc)))
        return False

    def _stop(self, msg: proto.Stop) -> bool:
        self.segments.drop(None)
        return True
