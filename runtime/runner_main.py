"""The runner child: loads one model with its backend and serves whole batches over a pipe.

Runs in a process forked from the preloaded forkserver (see :mod:`lastmile.runtime.runner`), so
importing torch/deepspeed/onnxruntime cost nothing here. Protocol (pickled tuples over a
``multiprocessing`` duplex pipe; tensors travel in the daemon's shared-memory segments):

daemon -> child
    ``("run", seq, in_segment, in_layout, out_segment, out_capacity, unmapped)``
    ``("out", seq, out_segment, out_capacity)``  answer to ``need``
    ``("memory", seq)`` / ``("shrink", seq, unmapped)`` / ``("stop",)``
child -> daemon
    ``("phase", name, data)``, ``("ready", info)``, ``("load_error", text)``
    ``("ok", seq, payload[, backend_s])``, ``("err", seq, text)``
    ``("need", seq, nbytes)``  outputs are larger than the given buffer

``unmapped`` lists segments the pool unlinked since the last message (``None``: all), so
this process drops its mappings and the memory really returns to the OS.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
from pickle import HIGHEST_PROTOCOL, dumps
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing import popen_forkserver, spawn
from multiprocessing.context import ForkServerProcess
from typing import Any

import numpy as np

from lastmile.runtime.shm import SegmentCache, layout_of, pack, views

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
MAX_ERROR_CHARS = 4000


def _noop() -> None:
    """Target of the forkserver warm-up process."""


def _call_and_send(conn: Any, module: str, function: str, args: tuple) -> None:
    """Target of :func:`lastmile.runtime.runner.call_in_forkserver`: torch and DeepSpeed are already
    imported in the forkserver, so the call costs a fork, not seconds of imports."""
    import importlib

    try:
        conn.send(("ok", getattr(importlib.import_module(module), function)(*args)))
    except Exception as exc:  # noqa: BLE001 - reported to the caller as text
        conn.send(("error", describe_error(exc)))
    finally:
        conn.close()


# --- the process class (pickled by reference: it lives in this preloaded module) -----------

_prep_lock = threading.Lock()


def _lean_preparation_data(original: Any) -> Any:
    def prepare(name: str) -> dict:
        data = original(name)
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
        return data

    return prepare


class _LeanPopen(popen_forkserver.Popen):
    """The forkserver launcher without "re-import the daemon's ``__main__`` in the child".

    multiprocessing tells every child to import the parent's main module (``lastmile.appliance.client.cli``
    for ``python -m lastmile.appliance.client.cli``, the console script for ``lastmile``): a runner needs none
    of it, and it would cost every load the import of the daemon's HTTP stack. The swap of
    ``spawn.get_preparation_data`` is held under a lock for the duration of one launch.
    """

    def _launch(self, process_obj: Any) -> None:
        with _prep_lock:
            original = spawn.get_preparation_data
            spawn.get_preparation_data = _lean_preparation_data(original)
            try:
                super()._launch(process_obj)
            finally:
                spawn.get_preparation_data = original


class RunnerProcess(ForkServerProcess):
    """A forkserver process that does not import the parent's ``__main__``."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # noqa: N802 - multiprocessing's name
        return _LeanPopen(process_obj)


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


def warmup_inputs(manifest: Any, rows: int) -> dict[str, np.ndarray] | None:
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


def main(rx: Any, tx: Any, manifest: Any, settings: Any, label: str) -> None:
    """Process entry point (``multiprocessing`` target). ``rx``/``tx``: the two one-way pipes
    (plain pipes wake the other side faster than a socketpair)."""
    _setup_process(label)
    # Objects inherited from the forkserver (torch, onnxruntime... ~100 MB) stay out of the
    # collector: a full collection writes every object's header, copying each shared page
    # into this process (measured: USS 10 -> 113 MB with no new allocation).
    gc.freeze()
    from lastmile.runtime.memory.cap import tune_allocator

    tune_allocator(bool(getattr(settings, "memory_limit_mb", None)))  # before the backend starts threads
    send = tx.send
    send(("phase", "loading", {"pid": os.getpid()}))
    started = time.perf_counter()
    try:
        from lastmile.runtime.backends import create_backend

        backend = create_backend(manifest, settings)
    except BaseException as exc:  # noqa: BLE001 - everything becomes the load error text
        traceback.print_exc(file=sys.stderr)
        send(("load_error", describe_error(exc)))
        tx.close()
        return
    load_s = time.perf_counter() - started

    send(("phase", "warming", {"load_s": round(load_s, 4)}))
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
        send(("load_error", f"warm-up batch of {rows_tried[-1]} rows failed: {describe_error(exc)}"))
        try:
            backend.close()
        finally:
            tx.close()
        return
    warmup_s = time.perf_counter() - warm_started
    from lastmile.runtime.memory.cap import HardCap

    # the hard cap, before "ready": this process owns its state, the backend knows nothing of it
    cap = HardCap.after_warmup(getattr(settings, "memory_limit_mb", None), getattr(backend, "_kind", "cpu"))
    try:
        info = dict(backend.info())
    except Exception as exc:  # noqa: BLE001
        info = {"info_error": describe_error(exc)}
    info["hard_cap"] = cap.as_dict()
    info.update(load_s=round(load_s, 4), warmup_s=round(warmup_s, 4), warmup_rows=rows_tried)
    send(("ready", info))
    try:
        _serve(rx, tx, backend, cap)
    finally:
        try:
            backend.close()
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)


def _serve(rx: Any, tx: Any, backend: Any, cap: Any) -> None:
    """Answer requests until ``stop`` or the daemon's end of the pipe closes."""
    recv = rx.recv
    send_bytes = tx.send_bytes

    def send(msg: tuple) -> None:  # plain pickle: several µs less than Connection.send
        send_bytes(dumps(msg, HIGHEST_PROTOCOL))

    perf_counter = time.perf_counter
    cap.recap()  # the memory cap, from what is mapped now that serving starts
    segments = SegmentCache()
    backlog: deque = deque()  # messages that arrived while waiting for an "out" answer
    while True:
        if backlog:
            msg = backlog.popleft()
        else:
            try:
                msg = recv()
            except (EOFError, OSError):
                return
        op = msg[0]
        if op == "run":
            _, seq, in_name, in_layout, out_name, out_cap, unmapped = msg
            if unmapped is None or unmapped:
                segments.drop(unmapped)
            try:
                inputs = views(segments.get(in_name), in_layout, readonly=True)
                t0 = perf_counter()
                outputs = _as_arrays(backend.run(inputs))
                backend_s = perf_counter() - t0
                del inputs
                layout, total = layout_of(outputs)
                if total > out_cap:
                    send(("need", seq, total))
                    while True:
                        try:
                            reply = recv()
                        except (EOFError, OSError):
                            return
                        if reply[0] == "out" and reply[1] == seq:
                            if reply[2] is None:
                                raise RuntimeError(f"no output buffer of {total} bytes: {reply[3]}")
                            out_name = reply[2]
                            break
                        backlog.append(reply)
                pack(outputs, segments.get(out_name), layout)
                del outputs
            except Exception as exc:  # noqa: BLE001 - reported for this batch; keep serving
                send(("err", seq, describe_error(exc)))
                continue
            send(("ok", seq, layout, backend_s))
        elif op == "memory":
            try:
                send(("ok", msg[1], dict(backend.memory())))
            except Exception as exc:  # noqa: BLE001
                send(("err", msg[1], describe_error(exc)))
        elif op == "shrink":
            try:
                segments.drop(msg[2])
                backend.shrink()
                gc.collect()
                cap.recap()  # before the trim: its holes refill without new address space
                _malloc_trim()
                send(("ok", msg[1], None))
            except Exception as exc:  # noqa: BLE001
                send(("err", msg[1], describe_error(exc)))
        elif op == "stop":
            segments.drop(None)
            return
        elif op == "out":
            continue  # late answer for a batch that already failed
        else:
            send(("err", msg[1] if len(msg) > 1 else 0, f"unknown runner command {op!r}"))
