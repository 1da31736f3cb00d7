"""The generation runner child: loads one causal LM and serves streams over the runner pipes.

Started by :class:`lastmile.runtime.generation.runner.GenerationRunner` from the same
forkserver as tensor runners. One loop does everything (no threads): while sequences run, it
takes every waiting message without blocking, runs one engine iteration and sends the chunks
of that iteration in one message; when idle it blocks on the pipe.

daemon -> child
    ``("gen", key, GenerationRequest)``, ``("cancel", key)``,
    ``("memory", seq)``, ``("shrink", seq, unmapped)``, ``("stop",)``
child -> daemon
    ``("phase", name, data)``, ``("ready", info)``, ``("load_error", text)``
    ``("accepted", key, prompt_tokens)``, ``("rejected", key, kind, args)``
    ``("chunks", [(key, GenerationChunk), ...])``, ``("stats", dict)``, ``("ok", seq, payload)``
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pickle import HIGHEST_PROTOCOL, dumps
from typing import Any

STATS_EVERY_S = 0.25


def load(folder: str, gs: Any) -> tuple[Any, Any]:
    """(engine, tokenizer) for an HF causal-LM folder with the given GenerationSettings."""
    from transformers import AutoTokenizer

    from lastmile.runtime.backends.threads import resolve_threads

    tokenizer = AutoTokenizer.from_pretrained(folder)
    threads = resolve_threads(gs.threads)
    if gs.engine == "deepspeed":
        from lastmile.runtime.generation.torch_engine import TorchEngine

        engine = TorchEngine(folder, max_num_seqs=gs.max_num_seqs, max_context=gs.max_context,
                             dtype=gs.dtype if gs.dtype in ("fp32", "bf16") else "fp32", device=gs.device,
                             prefill_chunk=gs.prefill_chunk, threads=threads)
    elif gs.engine == "ort-genai":
        from lastmile.runtime.generation.ort_engine import OrtGenAIEngine

        engine = OrtGenAIEngine.from_hf_folder(folder, precision=gs.precision, max_num_seqs=gs.max_num_seqs,
                                               max_context=gs.max_context, threads=threads)
    else:
        raise ValueError(f"engine {gs.engine!r} unknown; known: deepspeed, ort-genai")
    return engine, tokenizer


def main(rx: Any, tx: Any, manifest: Any, settings: Any, label: str) -> None:
    """Process entry point (``multiprocessing`` target), same signature as the tensor runner's."""
    from lastmile.runtime import runner_main
    from lastmile.runtime.generation.config import GenerationSettings, causal_lm_config
    from lastmile.runtime.generation.scheduler import GenerationScheduler
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    runner_main._setup_process(label)
    gc.freeze()
    send = tx.send
    send(("phase", "loading", {"pid": os.getpid()}))
    started = time.perf_counter()
    try:
        folder = str(manifest.artifact)
        cfg = causal_lm_config(manifest.artifact) or {}
        gs = GenerationSettings.from_settings(settings, cfg.get("max_position_embeddings"))
        engine, tokenizer = load(folder, gs)
        sched = GenerationScheduler(engine, tokenizer, max_queue=gs.max_queue)
        load_s = time.perf_counter() - started
        send(("phase", "warming", {"load_s": round(load_s, 4)}))
        t0 = time.perf_counter()
        sched.submit("warmup", GenerationRequest(SamplingParams(max_tokens=2, temperature=0.0),
                                                 prompt_token_ids=(0,) * 4))
        while sched.has_work():
            sched.step()
        sched.requests_total = sched.prompt_tokens_total = sched.generated_tokens_total = 0
        sched.ttft_s.clear()
        sched.itl_s.clear()
        warmup_s = time.perf_counter() - t0
    except BaseException as exc:  # noqa: BLE001 - everything becomes the load error text
        traceback.print_exc(file=sys.stderr)
        send(("load_error", runner_main.describe_error(exc)))
        tx.close()
        return
    info = {"generation": True, **engine.info(), "load_s": round(load_s, 4), "warmup_s": round(warmup_s, 4),
            "device": gs.device}
    send(("ready", info))
    try:
        serve(rx, tx, sched)
    finally:
        engine.close()


def _rejection(exc: BaseException) -> tuple[str, tuple]:
    """What crosses the pipe for a refused request (exceptions with custom __init__ do not
    all pickle; these tuples rebuild them on the daemon side)."""
    from lastmile.runtime.errors import QueueFull
    from lastmile.runtime.generation.types import ContextOverflow, InvalidSamplingParams

    if isinstance(exc, ContextOverflow):
        return "context_overflow", (exc.prompt_tokens, exc.max_tokens, exc.max_context, exc.field)
    if isinstance(exc, QueueFull):
        return "queue_full", (exc.depth, exc.max_queue, exc.retry_after_s)
    if isinstance(exc, InvalidSamplingParams):
        return "invalid", (getattr(exc, "field", ""), str(exc))
    return "error", (f"{type(exc).__name__}: {exc}",)


def serve(rx: Any, tx: Any, sched: Any) -> None:
    """Until ``stop`` or EOF: take messages, step, send chunks."""
    from lastmile.runtime.runner_main import _malloc_trim

    send_bytes = tx.send_bytes

    def send(msg: tuple) -> None:
        send_bytes(dumps(msg, HIGHEST_PROTOCOL))

    last_stats = 0.0
    was_busy = False

    def handle(msg: tuple) -> bool:
        op = msg[0]
        if op == "gen":
            key, request = msg[1], msg[2]
            try:
                n = sched.submit(key, request)
            except Exception as exc:  # noqa: BLE001 - refused before queueing: the client's answer
                kind, args = _rejection(exc)
                send(("rejected", key, kind, args))
            else:
                send(("accepted", key, n))
        elif op == "cancel":
            sched.cancel(msg[1])
        elif op == "memory":
            send(("ok", msg[1], {"generation": sched.stats()}))
        elif op == "shrink":
            gc.collect()
            _malloc_trim()
            send(("ok", msg[1], None))
        elif op == "stop":
            return False
        else:
            send(("ok", msg[1] if len(msg) > 1 else 0, None))
        return True

    while True:
        try:
            if sched.has_work():
                while rx.poll(0):
                    if not handle(rx.recv()):
                        return
            elif not handle(rx.recv()):
                return
        except (EOFError, OSError):
            return
        chunks = sched.step() if sched.has_work() else []
        if chunks:
            send(("chunks", chunks))
        busy = sched.has_work()
        now = time.monotonic()
        if busy != was_busy or now - last_stats >= STATS_EVERY_S:
            send(("stats", sched.stats()))
            last_stats, was_busy = now, busy
            if not busy:
                _malloc_trim()  # the freed KV goes back to the OS, not just to malloc
