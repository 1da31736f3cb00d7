"""The preloaded forkserver every runner process is forked from.

Why: the forkserver imports torch, DeepSpeed and ONNX Runtime once (:func:`warm_up`, at daemon
start), so starting a runner costs a ``fork`` and the model's load, not seconds of imports.
The daemon itself never imports torch: what needs it (host facts, building the demo models)
runs in a child of the forkserver through :func:`call_in_forkserver`.

This module is imported by both sides: by the daemon (to start processes) and, through
:data:`PRELOAD`, by the forkserver, because the process class and the targets below are
pickled by reference and must resolve there without new imports. It imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import multiprocessing
import os
import threading
import time
from multiprocessing import popen_forkserver, spawn
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import Any, Callable

from lastmile.runtime import protocol
from lastmile.runtime.accelerators import device_nodes
from lastmile.runtime.backends.threads import set_thread_env
from lastmile.runtime.errors import LoadError, describe_exit

# What the forkserver imports once, so that a load pays for the model and not for imports.
# Beyond the libraries: the lazily imported machinery ``torch.export.load`` pulls in (sympy,
# networkx, dynamo, functorch, inductor's config: ~1200 modules, 3 s of a demo model's 3.7 s
# load here) and our backend modules. Imports only: nothing may start a thread or touch a
# device in the forkserver (a fork copies neither threads nor a CUDA context). A failing
# import is skipped by the forkserver. Tests may shorten the list before the first start.
PRELOAD = [
    "lastmile.runtime.forkserver_prep",  # first: one malloc arena before any library starts threads
    "numpy",
    "onnxruntime",
    "torch",
    "deepspeed",
    "sympy",
    "networkx",
    "torch.export",
    "torch.export._trace",
    "torch._export.serde.serialize",
    "torch._functorch.aot_autograd",
    "torch._dynamo",
    "torch._inductor",
    "lastmile.runtime.backends",
    "lastmile.runtime.backends.onnx_backend",
    "lastmile.runtime.backends.deepspeed_backend",
    "lastmile.runtime.forkserver",
    "lastmile.runtime.runner_main",
    "lastmile.runtime.forkserver_gc",  # last: gc.freeze() what was preloaded (see that module)
]

_ctx_lock = threading.Lock()
_ctx: ForkServerContext | None = None


def _accelerator_env() -> None:
    """Pin ``DS_ACCELERATOR`` before the forkserver imports deepspeed, from device nodes only
    (importing torch in the daemon to ask would cost seconds and hundreds of MB).

    Why it matters: importing deepspeed runs its accelerator auto-detection, which calls
    ``torch.cuda.is_available()``; in the forkserver that would initialise the CUDA driver,
    and CUDA does not survive ``fork``: every runner would fail on its first CUDA call. With
    the accelerator named, DeepSpeed skips that probe; ``PYTORCH_NVML_BASED_CUDA_CHECK=1``
    makes any other ``is_available()`` ask NVML instead of initialising CUDA. Same choice as
    :func:`lastmile.runtime.accelerators.ensure_ds_accelerator` (cuda, else npu, else cpu); an
    operator's own ``DS_ACCELERATOR`` wins.
    """
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if os.environ.get("DS_ACCELERATOR"):
        return
    cuda_hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    if not cuda_hidden and device_nodes("cuda"):
        chosen = "cuda"
    elif device_nodes("npu") and importlib.util.find_spec("torch_npu") is not None:
        chosen = "npu"
    else:
        chosen = "cpu"
    os.environ["DS_ACCELERATOR"] = chosen


def get_context() -> ForkServerContext:
    """The forkserver context with lastmile's preload list (set once, before it starts)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _accelerator_env()
            set_thread_env()  # OpenMP reads its wait policy once, when torch loads it
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(list(PRELOAD))
            _ctx = ctx
        return _ctx


# --- the process class (pickled by reference: it lives in this preloaded module) -------------

_prep_lock = threading.Lock()


def _lean_preparation_data(original: Callable[[str], dict]) -> Callable[[str], dict]:
    def prepare(name: str) -> dict:
        data = original(name)
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
        return data

    return prepare


class _LeanPopen(popen_forkserver.Popen):
    """The forkserver launcher without "re-import the daemon's ``__main__`` in the child".

    multiprocessing tells every child to import the parent's main module
    (``lastmile.appliance.client.cli`` for ``python -m``, the console script for ``lastmile``):
    a runner needs none of it, and it would cost every load the import of the daemon's HTTP
    stack. The swap of ``spawn.get_preparation_data`` is held under a lock for the duration
    of one launch.
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


# --- warm-up and one-off calls ----------------------------------------------------------------


def _noop() -> None:
    """Target of the forkserver warm-up process."""


def _call_and_send(conn: Connection, module: str, function: str, args: tuple) -> None:
    """Target of :func:`call_in_forkserver` (runs in the child): torch and DeepSpeed are
    already imported in the forkserver, so the call costs a fork, not seconds of imports."""
    from lastmile.runtime.runner_main import describe_error

    try:
        answer: protocol.Message = protocol.Done(protocol.NO_SEQ, getattr(importlib.import_module(module), function)(*args))
    except Exception as exc:  # noqa: BLE001 - reported to the caller as text
        answer = protocol.Failed(protocol.NO_SEQ, describe_error(exc))
    try:
        conn.send_bytes(protocol.encode(answer))
    finally:
        conn.close()


def warm_up(timeout_s: float = 600.0) -> float:
    """Start the forkserver and block until its preload (torch, deepspeed, onnxruntime...)
    is done, by starting and joining a no-op process. Returns the seconds it took. The
    daemon calls this once at start (from a thread: it blocks), before the first load."""
    get_context()  # configures the forkserver and its preload list on first use
    started = time.perf_counter()
    proc = RunnerProcess(target=_noop, name="lastmile-warmup", daemon=True)
    proc.start()
    proc.join(timeout_s)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise LoadError(f"forkserver did not come up within {timeout_s:g} s")
    proc.close()
    return time.perf_counter() - started


async def warm_up_async(timeout_s: float = 600.0) -> float:
    """:func:`warm_up` without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, warm_up, timeout_s)


def call_in_forkserver(module: str, function: str, *args: Any, timeout_s: float = 300.0) -> Any:
    """``module.function(*args)`` in a child of the preloaded forkserver, for work that needs
    torch or DeepSpeed (host facts, building the demo models): the daemon itself never imports
    them, which would cost it ~100-300 MB for its whole life and seconds of a blocked thread.
    Blocking: call it from a thread. The result must be picklable."""
    get_context()
    receiver, sender = multiprocessing.Pipe(duplex=False)
    proc = RunnerProcess(target=_call_and_send, args=(sender, module, function, args), name=f"lastmile-{function}", daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise LoadError(f"{module}.{function} did not answer within {timeout_s:g} s")
        answer = protocol.decode(receiver.recv_bytes())
    except EOFError:
        proc.join(5)
        raise LoadError(f"{module}.{function} died ({describe_exit(proc.exitcode)})") from None
    finally:
        receiver.close()
        proc.join(5)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    if isinstance(answer, protocol.Failed):
        raise LoadError(f"{module}.{function} failed: {answer.error}")
    assert isinstance(answer, protocol.Done)
    return answer.payload
