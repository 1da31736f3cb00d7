"""The generation runner child: loads one causal LM and serves streams over the runner pipes.

Started by :class:`lastmile.runtime.generation.runner.GenerationRunner` from the same
forkserver as tensor runners. One loop does everything (no threads): while sequences run, it
takes every waiting message without blocking, runs one engine iteration and sends the chunks
of that iteration in one message; when idle it blocks on the pipe.

Messages (:mod:`lastmile.runtime.protocol`):

daemon -> child
    :class:`Generate`, :class:`Cancel`, :class:`Slots`, :class:`MemoryQuery`, :class:`Shrink`, :class:`Stop`
child -> daemon
    :class:`Phase`, :class:`Ready`, :class:`LoadFailed` (start-up); :class:`Accepted` or
    :class:`Refused` per sequence, :class:`Tokens` per engine iteration, :class:`EngineStats`;
    :class:`Done` answers a memory query or a shrink
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from typing import Any

from lastmile.runtime.protocol import (NO_SEQ, Accepted, Cancel, Done, EngineStats, Generate, LoadFailed, MemoryQuery, Phase,
                                       Ready, Refused, Shrink, Slots, Stop, ToDaemon, ToRunner, Tokens, decode, encode)

STATS_EVERY_S = 0.25
#: Idle this long, the child gives freed KV back to the OS (malloc_trim). Not at once: the next
#: request would page it all back in; trimming at every request's end cost SmolLM2 int4 ~65 ms
#: of TTFT (203-213 -> 137-145 ms, in-process 136) and 20% of one stream's tokens/s.
IDLE_TRIM_S = 0.25
#: Message handling (mostly tokenizing new prompts) done between two engine steps while
#: sequences run; the rest waits for the next gap.
MESSAGES_BUDGET_S = 0.005


def load(folder: str, gs: Any, on_phase: Any = None) -> tuple[Any, Any]:
    """(engine, tokenizer) for an HF causal-LM folder with the given GenerationSettings."""
    from transformers import AutoTokenizer

    from lastmile.runtime.backends.threads import usable_cores

    tokenizer = AutoTokenizer.from_pretrained(folder)
    # auto: every usable core. A generation step is one large call per token for all running
    # sequences and the daemon's share per token is small (SmolLM2 int8, 16 streams in-process on
    # the 2-core box: 76 tokens/s with 1 thread, 128 with 2), unlike the tensor runners' many
    # small calls, where a core is left to the daemon's event loop (backends/threads.py).
    threads = gs.threads or usable_cores()
    if gs.engine == "deepspeed":
        from lastmile.runtime.generation.torch_engine import TorchEngine

        engine = TorchEngine(folder, max_num_seqs=gs.max_num_seqs, max_context=gs.max_context,
                             dtype=gs.dtype if gs.dtype in ("fp32", "bf16") else "fp32", device=gs.device,
                             prefill_chunk=gs.prefill_chunk, threads=threads)
    elif gs.engine == "ort-genai":
        from lastmile.runtime.generation.ort_engine import OrtGenAIEngine

        precision, chosen_by = gs.precision, None
        if precision == "auto":
            from lastmile.runtime.generation.quality import auto_precision

            chosen_by = auto_precision(folder, threads=threads, on_phase=on_phase)
            precision = chosen_by["chosen"]
        engine = OrtGenAIEngine.from_hf_folder(folder, precision=precision, max_num_seqs=gs.max_num_seqs,
                                               max_context=gs.max_context, threads=threads,
                                               prefill_chunk=gs.prefill_chunk, on_phase=on_phase)
        if chosen_by is not None:
            engine.quality = {k: chosen_by.get(k) for k in ("agreement", "exact", "prompts", "min_agreement", "reference")}
    else:
        raise ValueError(f"engine {gs.engine!r} unknown; known: deepspeed, ort-genai")
    return engine, tokenizer


def main(rx: Any, tx: Any, manifest: Any, settings: Any, label: str, factory: Any = None) -> None:
    """Process entry point (``multiprocessing`` target), same signature as the tensor runner's
    (``factory``, the tensor runner's backend factory, has no meaning here)."""
    from lastmile.runtime import runner_main
    from lastmile.runtime.generation.config import GenerationSettings, causal_lm_config
    from lastmile.runtime.generation.scheduler import GenerationScheduler
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    runner_main._setup_process(label)
    gc.freeze()
    def send(msg: ToDaemon) -> None:
        tx.send_bytes(encode(msg))

    send(Phase(NO_SEQ, "loading", {"pid": os.getpid()}))
    started = time.perf_counter()
    try:
        folder = str(manifest.artifact)
        cfg = causal_lm_config(manifest.artifact) or {}
        gs = GenerationSettings.from_settings(settings, cfg)
        engine, tokenizer = load(folder, gs, on_phase=lambda name, data: send(Phase(NO_SEQ, name, data)))
        sched = GenerationScheduler(engine, tokenizer, max_queue=gs.max_queue)
        load_s = time.perf_counter() - started
        send(Phase(NO_SEQ, "warming", {"load_s": round(load_s, 4)}))
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
        send(LoadFailed(NO_SEQ, runner_main.describe_error(exc)))
        tx.close()
        return
    info = {"generation": True, **engine.info(), "load_s": round(load_s, 4), "warmup_s": round(warmup_s, 4),
            "device": gs.device, "max_num_seqs_auto": gs.max_num_seqs_auto}
    send(Ready(NO_SEQ, info))
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

    def send(msg: ToDaemon) -> None:
        send_bytes(encode(msg))

    last_stats = 0.0
    was_busy = False
    trim_due = False  # went idle since the last trim

    def handle(msg: ToRunner) -> bool:
        kind = type(msg)
        if kind is Generate:
            try:
                n = sched.submit(msg.seq, msg.request)
            except Exception as exc:  # noqa: BLE001 - refused before queueing: the client's answer
                send(Refused(msg.seq, *_rejection(exc)))
            else:
                send(Accepted(msg.seq, n))
        elif kind is Cancel:
            sched.cancel(msg.seq)
        elif kind is Slots:
            sched.set_slots(msg.limit)
            send(EngineStats(NO_SEQ, sched.stats()))
        elif kind is MemoryQuery:
            send(Done(msg.seq, {"generation": sched.stats()}))
        elif kind is Shrink:
            sched.engine.shrink()
            gc.collect()
            _malloc_trim()
            send(Done(msg.seq, None))
        elif kind is Stop:
            return False
        else:
            send(Done(msg.seq, None))
        return True

    while True:
        try:
            if sched.has_work():
                # between two steps, at most MESSAGES_BUDGET_S of message work (a burst of
                # prompts to tokenize waits for the next gap instead of stalling every stream)
                until = time.monotonic() + MESSAGES_BUDGET_S
                while rx.poll(0):
                    if not handle(decode(rx.recv_bytes())):
                        return
                    if time.monotonic() >= until:
                        break
            elif trim_due and not rx.poll(IDLE_TRIM_S):
                _malloc_trim()  # idle for a while: the freed KV goes back to the OS, not just to malloc
                trim_due = False
                continue
            elif not handle(decode(rx.recv_bytes())):
                return
        except (EOFError, OSError):
            return
        chunks = sched.step() if sched.has_work() else []
        if chunks:
            send(Tokens(NO_SEQ, chunks))
        for key, why in sched.take_failures():  # ended alone by an error of its own; the rest go on
            send(Refused(key, "error", (why,)))
        busy = sched.has_work()
        now = time.monotonic()
        if busy != was_busy or now - last_stats >= STATS_EVERY_S:
            send(EngineStats(NO_SEQ, sched.stats()))
            last_stats, was_busy = now, busy
            trim_due = trim_due or not busy
