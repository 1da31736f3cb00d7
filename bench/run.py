"""The benchmark: Lastmile against the in-process limit, a naive server and a peer framework,
same model, same backend session settings, one after another on the same machine, in one run.

``python -m bench`` (or ``lastmile bench``) for every model asked:

1. **limit**: ``bench.limit`` in its own process, ``backend.run`` back to back at batch sizes
   1, 2, 4... ``max_batch_size``: rows/s per batch size, and the latency of one 1-row call;
2. **lastmile**: a fresh daemon (``lastmile serve``) on a temp socket, the model loaded with the
   settings, closed-loop load at each client count (binary tensor extension); the batch sizes
   it formed are read from ``GET /lm/v1/models/{name}`` before and after;
3. **lastmile-json**: the same daemon, the same requests as JSON tensors (what the peer gets);
3b. **lastmile-grpc**: the same daemon, the same requests as KServe V2 gRPC ``ModelInfer`` with
   ``raw_input_contents`` (its Unix socket ``lastmile-grpc.sock``, or ``server.grpc_port`` with
   the bearer token over ``--transport tcp``); the bench checks once that its answer equals
   the binary HTTP one (``grpc_answers_match_http``);
4. **naive**: ``bench.naive`` (aiohttp, same codec, one request = one forward call);
5. **peer**: ``bench.peer_litserve`` (LitServe with the same batch size and delay), JSON.

Ratios are to the limit: ``vs_limit`` = rows/s over the best in-process rows/s;
``vs_limit_same_batch`` = rows/s over in-process rows/s at the batch size the server formed;
``added_p50_ms`` (1 client) = p50 minus the in-process p50 of a 1-row call back to back;
``added_p50_paced_ms`` = the same against a 1-row call after a 1 ms pause (see ``bench.limit``).

Before any server, the load generator is measured against a canned-response server with the
same request bytes (``generator`` in the JSON; ``generator_grpc`` for the gRPC row, against a
canned gRPC server): a server result near that figure would be the generator's limit, not the
server's (flagged ``generator_bound``).

``--defaults`` loads every model with no settings at all (the daemon's defaults: what an
operator gets out of the box) instead of the bench's tuned ones (``threads=1``, the model's
``max_batch_size``, ``max_delay_ms=0``); the limit, naive and peer then use the same defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import psutil

from bench.common import Progress, backend_of, default_max_batch, inputs_for, report
from bench.heavy import HEAVY_MODEL
from lastmile.appliance.v2codec import encode_request
from lastmile.appliance.client.loadgen import (Exchange, Result, Target, closed_loop, closed_window, generator_capacity,
                                               http_request, new_event_loop, open_loop, summarize)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ["demo-mlp", "demo-mlp-ds", "demo-lm", "demo-lm-ds"]
SERVERS = ("lastmile", "lastmile-json", "lastmile-grpc", "naive", "peer")
LASTMILE_SERVERS = ("lastmile", "lastmile-json", "lastmile-grpc")  # rows served by the one daemon
BENCH_SETTINGS = ("max_batch_size", "max_delay_ms", "threads")  # what the bench tunes (and --defaults leaves alone)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LASTMILE_", "NOTIFY_SOCKET", "LISTEN_"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _http_ok(target: Target, path: str) -> bool:
    try:
        if target.unix:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(target.unix)
        else:
            s = socket.create_connection((target.host, target.port), timeout=1)
    except OSError:
        return False
    try:
        s.sendall(http_request(target, "GET", path, b"").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


class Proc:
    """A server process of the benchmark, stopped by its pid (process group)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env or _env(), stdout=subprocess.DEVNULL,
                                     stderr=open(log, "wb"), start_new_session=True)

    def wait_ready(self, target: Target, path: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not _http_ok(target, path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout_s:g} s: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class _CpuMeter:
    """CPU seconds a server's whole process tree (daemon, forkserver, runners; LitServe's
    workers) and this process (the load generator) spend over the measured window: where a
    request's cost goes on a machine whose cores all of them share."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.t0: tuple[float, float] | None = None

    def _now(self) -> tuple[float, float]:
        server = 0.0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                server += t.user + t.system
            except psutil.Error:
                pass
        return server, time.process_time()

    def start(self) -> None:
        self.t0 = self._now()

    def per_request(self, requests: int) -> dict[str, float | None]:
        if self.t0 is None or not requests:
            return {"server_cpu_us": None, "loadgen_cpu_us": None}
        server, gen = self._now()
        return {"server_cpu_us": round((server - self.t0[0]) / requests * 1e6, 1),
                "loadgen_cpu_us": round((gen - self.t0[1]) / requests * 1e6, 1)}


# --- the load: one interface, an HTTP client and a gRPC client ------------------------------


class Load(Protocol):
    """One server row's requests, the same shape whatever the protocol: a closed loop at a
    client count and an open loop at a rate (each a ``loadgen.Result``, so every row has the
    same figures), and one request's decoded outputs (to check an answer)."""

    async def closed(self, *, concurrency: int, duration_s: float, warmup_s: float,
                     on_measure: Callable[[], None] | None = None) -> Result: ...

    async def open(self, *, rate: float, duration_s: float) -> Result: ...

    async def answer(self) -> dict[str, np.ndarray]: ...


class HttpLoad:
    """A pre-encoded HTTP/1.1 request through ``loadgen`` (one keep-alive connection a client)."""

    def __init__(self, target: Target, request: bytes) -> None:
        self.target, self.request = target, request

    async def closed(self, *, concurrency: int, duration_s: float, warmup_s: float,
                     on_measure: Callable[[], None] | None = None) -> Result:
        return await closed_loop(self.target, self.request, concurrency=concurrency, duration_s=duration_s,
                                 warmup_s=warmup_s, on_measure=on_measure)

    async def open(self, *, rate: float, duration_s: float) -> Result:
        return await open_loop(self.target, self.request, rate=rate, duration_s=duration_s)

    async def answer(self) -> dict[str, np.ndarray]:
        from lastmile.appliance.v2codec import decode_response

        reader, writer = await self.target.connect()
        try:
            writer.write(self.request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            fields = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
            headers = {k.strip().lower(): v.strip() for k, v in fields.items()}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
        finally:
            writer.close()
        if int(head[9:12]) >= 400:
            raise RuntimeError(f"{self.target.describe()}: {head[:12]}: {body[:300].decode(errors='replace')}")
        return decode_response(body, headers.get("inference-header-content-length"))[0]


def _grpc_service() -> str:
    from lastmile.appliance.server.grpc import inference_pb2 as pb

    return pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService


class GrpcLoad:
    """KServe V2 ``ModelInfer`` over ``grpc.aio``. The request is built once with the project's
    own generated messages (``inference_pb2.ModelInferRequest``, ``raw_input_contents``) and sent
    pre-serialized on a bytes-in, bytes-out method at the stub's path; the answer is not parsed
    in the timed loop: what the HTTP generator does (pre-encoded bytes written, body never
    parsed). Chosen over tritonclient's aio client, which builds InferInput objects, a request
    message and an InferResult on every call: Python the HTTP row's generator does not pay, on
    a box where the generator shares the cores with the daemon (against the canned server of
    :func:`grpc_generator_capacity`, 4 clients, 2 cores: ~1.7k req/s for tritonclient.grpc.aio,
    ~2.1k here). grpc's own per-call cost stays, so ``generator_grpc`` is measured apart and
    judges this row's ``generator_bound``.

    One channel a client, each on its own subchannel (one HTTP/2 connection, as each HTTP
    client holds its own keep-alive connection); the open loop uses one channel (HTTP/2
    multiplexes the requests in flight, no pool needed)."""

    def __init__(self, address: str, request: bytes, token: str | None = None) -> None:
        self.address, self.request = address, request
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.method = f"/{_grpc_service()}/ModelInfer"

    def describe(self) -> str:  # how loadgen.summarize names the target
        return f"grpc:{self.address}"

    def _channel(self) -> Any:
        import grpc

        return grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                                ("grpc.max_receive_message_length", -1),
                                                                ("grpc.max_send_message_length", -1)])

    async def _ready(self, channels: list[Any]) -> list[Any]:
        import asyncio

        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{self.describe()}: no gRPC connection after 30 s") from None
        return [ch.unary_unary(self.method) for ch in channels]  # no serializers: bytes both ways

    @staticmethod
    def _sample(exc: Any) -> str:
        return f"gRPC {exc.code().name}: {(exc.details() or '')[:200]}"

    async def closed(self, *, concurrency: int, duration_s: float, warmup_s: float,
                     on_measure: Callable[[], None] | None = None) -> Result:
        """``loadgen.closed_window`` over one channel a client."""
        import asyncio

        import grpc

        request, metadata = self.request, self.metadata

        def exchange(call: Any) -> Exchange:
            async def one() -> str | None:
                try:
                    await call(request, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    return self._sample(exc)
                return None

            return one

        channels = [self._channel() for _ in range(concurrency)]
        try:
            calls = await self._ready(channels)
            elapsed, lat, errors, samples = await closed_window([exchange(c) for c in calls], duration_s=duration_s,
                                                                warmup_s=warmup_s, on_measure=on_measure)
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
        return summarize("closed", self, concurrency, None, elapsed, lat, errors, 1, samples)  # type: ignore[arg-type]

    async def open(self, *, rate: float, duration_s: float) -> Result:
        """``loadgen.open_loop``'s schedule: a start every ``1/rate`` s, latency from when it was due."""
        import asyncio

        import grpc

        channel = self._channel()
        try:
            (call,) = await self._ready([channel])
            lat: list[float] = []
            lags: list[float] = []
            errors = 0
            samples: list[str] = []
            clock = time.perf_counter

            async def one(due: float) -> None:
                nonlocal errors
                lags.append(clock() - due)
                try:
                    await call(self.request, metadata=self.metadata)
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(self._sample(exc))
                    return
                lat.append(clock() - due)

            tasks = []
            start = clock()
            for i in range(max(1, int(rate * duration_s))):
                due = start + i / rate
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(due)))
            await asyncio.gather(*tasks)
            elapsed = clock() - start
        finally:
            await channel.close()
        result = summarize("open", self, 0, rate, elapsed, lat, errors, 1, samples, lags)  # type: ignore[arg-type]
        result.extra["connections"] = 1
        return result

    async def answer(self) -> dict[str, np.ndarray]:
        from lastmile.appliance.server.grpc import inference_pb2 as pb
        from lastmile.models.spec import V2_TO_NUMPY

        channel = self._channel()
        try:
            (call,) = await self._ready([channel])
            response = pb.ModelInferResponse.FromString(await call(self.request, metadata=self.metadata))
        finally:
            await channel.close()
        return {out.name: np.frombuffer(raw, dtype=V2_TO_NUMPY[out.datatype]).reshape(list(out.shape))
                for out, raw in zip(response.outputs, response.raw_output_contents)}


def grpc_request(inputs: dict[str, np.ndarray], types: dict[str, str], model: str) -> bytes:
    """A serialized ``ModelInferRequest``: every input as ``raw_input_contents`` (the bytes the
    binary HTTP request carries), all outputs."""
    from lastmile.appliance.server.grpc import inference_pb2 as pb
    from lastmile.appliance.server.grpc_service import _raw

    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=types[name], shape=list(array.shape))
        request.raw_input_contents.append(_raw(array, types[name]))
    return request.SerializeToString()


async def grpc_generator_capacity(request: bytes, response_bytes: int = 300, *, concurrency: int = 64,
                                  duration_s: float = 1.0) -> Result:
    """``loadgen.generator_capacity`` for :class:`GrpcLoad`: its closed loop against a canned
    ``ModelInfer`` (a grpc.aio server in this process on a temp Unix socket)."""
    import grpc

    from lastmile.appliance.server.grpc import inference_pb2 as pb

    answer = pb.ModelInferResponse(model_name="canned", model_version="1")
    answer.outputs.add(name="y", datatype="UINT8", shape=[1, response_bytes])
    answer.raw_output_contents.append(b"x" * response_bytes)
    canned = answer.SerializeToString()

    async def infer(_request: bytes, _context: Any) -> bytes:
        return canned

    tmp = tempfile.mkdtemp(prefix="lm-gen-grpc-")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        _grpc_service(), {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
    path = os.path.join(tmp, "canned.sock")
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        return await GrpcLoad(f"unix:{path}", request).closed(concurrency=concurrency, duration_s=duration_s, warmup_s=0.2)
    finally:
        await server.stop(0)
        shutil.rmtree(tmp, ignore_errors=True)


def median_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry out of several interleaved passes: the limit of the pass with the median
    best rows/s, and for each server and client count the run with the median throughput
    (a whole run, so its latencies and CPU figures belong together). Every pass's figure is
    kept under ``repeats``. On a shared host whose neighbours come and go, the median of
    interleaved passes is what a single pass cannot be: comparable across servers."""
    if len(passes) == 1:
        return passes[0]

    def median(items: list[Any], key: Callable[[Any], float]) -> Any:
        return sorted(items, key=key)[(len(items) - 1) // 2]

    entry = dict(passes[0], servers={})
    entry["limit"] = dict(median([p["limit"] for p in passes], lambda lim: lim["best_rows_per_s"]))
    entry["limit"]["repeats"] = [p["limit"]["best_rows_per_s"] for p in passes]
    for name in passes[0]["servers"]:
        entry["servers"][name] = {}
        for key in passes[0]["servers"][name]:
            rows = [p["servers"][name][key] for p in passes]
            chosen = dict(median(rows, lambda r: r["throughput_rps"]))
            chosen["repeats"] = [r["throughput_rps"] for r in rows]
            entry["servers"][name][key] = chosen
    return entry


def limit_at(limit: dict[str, Any], batch: float) -> float | None:
    """In-process rows/s at ``batch`` rows (log-linear between the measured sizes)."""
    import math

    pts = sorted((int(k), v["rows_per_s"]) for k, v in limit["by_batch"].items())
    if not pts or batch <= 0:
        return None
    if batch <= pts[0][0]:
        return pts[0][1]
    for (b0, r0), (b1, r1) in zip(pts, pts[1:]):
        if b0 <= batch <= b1:
            t = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return r0 + t * (r1 - r0)
    return pts[-1][1]


class Bench:
    def __init__(self, *, models: list[str], clients: list[int], duration_s: float, warmup_s: float, servers: list[str],
                 transport: str, settings: dict[str, Any], store: Path | None, open_rate: float | None,
                 progress: Progress = print, repeat: int = 1, input_data: str | None = None, defaults: bool = False) -> None:
        unknown = [s for s in servers if s not in SERVERS]
        if unknown:
            raise ValueError(f"--servers: unknown {unknown}; known: {', '.join(SERVERS)}")
        if transport not in ("unix", "tcp"):
            raise ValueError(f"--transport: got {transport!r}; allowed: unix, tcp")
        if defaults and settings:
            raise ValueError(f"--defaults loads every model with no settings; drop --settings {json.dumps(settings)} or --defaults")
        self.defaults = defaults
        self.models, self.clients, self.duration_s, self.warmup_s = models, clients, duration_s, warmup_s
        self.servers, self.transport, self.settings, self.open_rate = servers, transport, settings, open_rate
        self.progress = progress
        if repeat < 1:
            raise ValueError(f"--repeat: got {repeat}; must be >= 1")
        self.repeat = repeat
        self.input_data = input_data
        self.tmp = Path(tempfile.mkdtemp(prefix="lastmile-bench-"))
        self.store = store or self.tmp / "store"

    # --- pieces ---------------------------------------------------------------------------

    def model_settings(self, model: str) -> dict[str, Any]:
        """The settings every server of a model runs with: the bench's tuned ones overlaid by
        ``--settings``, or with ``--defaults`` the daemon's own for the bench's knobs (the
        vocabulary's defaults < the manifest, as the daemon's manager merges them)."""
        if self.defaults:
            from lastmile.models.settings import ModelSettings

            from bench.common import manifest_of

            merged = ModelSettings().overlay(manifest_of(self.store, model).settings).as_dict()
            return {k: merged[k] for k in BENCH_SETTINGS}
        base = {"max_batch_size": default_max_batch(self.store, model), "max_delay_ms": 0.0, "threads": 1}
        base.update(self.settings)
        return base

    def load_parameters(self, settings: dict[str, Any]) -> dict[str, Any]:
        """What the daemon's load call gets: nothing with ``--defaults``, else ``settings``."""
        return {} if self.defaults else settings

    def inputs(self, model: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return inputs_for(self.store, model, 1, input_data=self.input_data)

    def request_bytes(self, target: Target, model: str, *, binary: bool, path: str | None = None) -> bytes:
        body, headers = encode_request(*self.inputs(model), binary=binary)
        return http_request(target, "POST", path or f"/v2/models/{model}/infer", body, headers)

    def measure_limit(self, model: str, settings: dict[str, Any]) -> dict[str, Any]:
        top = settings["max_batch_size"]
        batches = sorted({1, *(2 ** i for i in range(0, 13) if 2 ** i <= top), top})
        per = max(0.3, min(1.5, self.duration_s / 2))
        out = subprocess.run([sys.executable, "-m", "bench.limit", "--store", str(self.store), "--model", model, "--json",
                              "--settings", json.dumps({k: v for k, v in settings.items() if k not in ("max_delay_ms",)}),
                              "--batches", ",".join(map(str, batches)), "--duration-s", str(per)]
                             + (["--input-data", str(self.input_data)] if self.input_data else []),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"bench.limit failed for {model}: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def load_runs(self, name: str, load: Load, proc: Proc, stats: Callable[[], dict] | None = None) -> dict[str, Any]:
        results: dict[str, Any] = {}
        loop = new_event_loop()
        try:
            for c in self.clients:
                before = stats() if stats else None
                cpu = _CpuMeter(proc.proc.pid)
                r = loop.run_until_complete(load.closed(concurrency=c, duration_s=self.duration_s, warmup_s=self.warmup_s,
                                                        on_measure=cpu.start))
                row = r.as_dict()
                row.update(cpu.per_request(r.requests))
                if stats and before is not None:
                    after = stats()
                    batches = after.get("batches", 0) - before.get("batches", 0)
                    rows = after.get("rows", 0) - before.get("rows", 0)
                    row["avg_batch_size"] = round(rows / batches, 3) if batches else None
                elif name == "naive":
                    row["avg_batch_size"] = 1.0
                results[str(c)] = row
                self.progress(f"  {name:<14} {c:>3} clients: {r.throughput_rps:>9.1f} req/s  p50 {r.p50_ms} ms  "
                              f"p99 {r.p99_ms} ms  errors {r.errors}" + (f"  batch {row.get('avg_batch_size')}" if row.get("avg_batch_size") else "")
                              + f"  CPU/request: server {row['server_cpu_us']} us, load generator {row['loadgen_cpu_us']} us")
            if self.open_rate:
                r = loop.run_until_complete(load.open(rate=self.open_rate, duration_s=self.duration_s))
                results[f"open@{self.open_rate:g}"] = r.as_dict()
                self.progress(f"  {name:<14} open {self.open_rate:g}/s: {r.throughput_rps:.1f} req/s p50 {r.p50_ms} p99 {r.p99_ms} lag p99 {r.lag_p99_ms}")
        finally:
            loop.close()
        return results

    # --- servers --------------------------------------------------------------------------

    def start_lastmile(self) -> tuple[Proc, Target, str]:
        """The daemon, its HTTP target and its gRPC address: the Unix socket beside HTTP's
        (``lastmile-grpc.sock``, the daemon's default), or with TCP ``server.grpc_port`` on
        loopback behind the same bearer token."""
        home = self.tmp / "lastmile"
        (home / "run").mkdir(parents=True, exist_ok=True)
        sock = home / "run" / "lastmile.sock"
        server_extra = ""
        target = Target(unix=str(sock))
        grpc_address = f"unix:{sock.with_name('lastmile-grpc.sock')}"
        if self.transport == "tcp":
            token = secrets.token_hex(16)
            token_file = home / "token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            port = _free_port()
            grpc_port = _free_port()
            server_extra = f'tcp_port = {port}\ngrpc_port = {grpc_port}\ntoken_file = "{token_file}"\n'
            target = Target(host="127.0.0.1", port=port, token=token)
            grpc_address = f"127.0.0.1:{grpc_port}"
        config = home / "lastmile.toml"
        config.write_text(f'[server]\nsocket = "{sock}"\nlog_level = "warning"\n{server_extra}'
                          f'[store]\nmodels_dir = "{self.store}"\nstate_file = "{home / "state.json"}"\nbuild_demo = false\n')
        env = _env()
        env["HOME"] = str(home)
        proc = Proc("lastmile", [sys.executable, "-m", "lastmile.appliance.client.cli", "serve", "--config", str(config)], home / "daemon.log", env)
        proc.wait_ready(target, "/v2/health/ready")
        return proc, target, grpc_address

    def _control(self, target: Target, method: str, path: str, body: Any = None) -> Any:
        """A control call over a Unix socket or TCP with the same raw client (no aiohttp needed)."""
        async def go() -> Any:
            from lastmile.appliance.client.loadgen import read_response

            reader, writer = await target.connect()
            data = json.dumps(body).encode() if body is not None else b""
            writer.write(http_request(target, method, path, data, {"Content-Type": "application/json"}))
            status, payload = await read_response(reader)
            writer.close()
            if status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {status}: {payload[:500].decode(errors='replace')}")
            return json.loads(payload) if payload else None

        loop = new_event_loop()
        try:
            return loop.run_until_complete(go())
        finally:
            loop.close()

    # --- the run ----------------------------------------------------------------------------

    def prepare_store(self) -> None:
        """The demo models when the store lacks them, the heavy bench model when asked for;
        then every model asked must be in the store (one line naming the missing one)."""
        from lastmile.models.store import ModelStore

        if not (self.store / "demo-mlp").exists():
            self.progress(f"building the demo models in {self.store}")
            from lastmile.models.demo import build_demo

            build_demo(self.store)
        if HEAVY_MODEL in self.models and not (self.store / HEAVY_MODEL).exists():
            self.progress(f"building {HEAVY_MODEL} in {self.store}")
            from bench.heavy import build_heavy

            build_heavy(self.store)
        names = set(ModelStore(self.store).names())
        missing = [m for m in self.models if m not in names]
        if missing:
            raise ValueError(f"--models: {missing[0]!r} is not in the store {self.store}; it has {', '.join(sorted(names))}")

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.prepare_store()
        result: dict[str, Any] = {"meta": self.meta(), "models": {}}
        gen_target = Target(unix="/x")
        req = self.request_bytes(gen_target, self.models[0], binary=True)
        loop = new_event_loop()
        try:
            capacity = loop.run_until_complete(generator_capacity(req, b"x" * 300, concurrency=max(self.clients), duration_s=1.0))
        finally:
            loop.close()
        result["generator"] = capacity.as_dict()
        self.progress(f"load generator alone (canned server, {max(self.clients)} clients): {capacity.throughput_rps:.0f} req/s")
        grpc_rps = None
        if "lastmile-grpc" in self.servers:
            loop = new_event_loop()
            try:
                grpc_capacity = loop.run_until_complete(grpc_generator_capacity(grpc_request(*self.inputs(self.models[0]), self.models[0]),
                                                                                concurrency=max(self.clients), duration_s=1.0))
            finally:
                loop.close()
            result["generator_grpc"] = grpc_capacity.as_dict()
            grpc_rps = grpc_capacity.throughput_rps
            self.progress(f"gRPC load generator alone (canned server, {max(self.clients)} clients): {grpc_rps:.0f} req/s")
        lastmile: tuple[Proc, Target, str] | None = None
        try:
            for model in self.models:
                settings = self.model_settings(model)
                self.progress(f"{model} ({backend_of(self.store, model)}), settings {settings}")
                passes = []
                for i in range(self.repeat):
                    if self.repeat > 1:
                        self.progress(f" pass {i + 1} of {self.repeat}")
                    if lastmile is None and set(LASTMILE_SERVERS) & set(self.servers):
                        lastmile = self.start_lastmile()
                    passes.append(self._one_pass(model, settings, lastmile))
                entry = median_pass(passes)
                self.ratios(entry, capacity.throughput_rps, grpc_rps)
                result["models"][model] = entry
        finally:
            if lastmile is not None:
                lastmile[0].stop()
        result["meta"]["wall_s"] = round(time.time() - started, 1)
        result["meta"]["loadavg_end"] = os.getloadavg()
        return result

    def _one_pass(self, model: str, settings: dict[str, Any], lastmile: tuple[Proc, Target, str] | None) -> dict[str, Any]:
        """The limit, then each server, once."""
        entry: dict[str, Any] = {"backend": backend_of(self.store, model), "settings": settings,
                                 "load_parameters": self.load_parameters(settings), "servers": {}}
        entry["limit"] = limit = self.measure_limit(model, settings)
        self.progress(f"  {'limit':<14} best {limit['best_rows_per_s']:.0f} rows/s at batch {limit['best_batch']}; "
                      f"1-row call p50 {limit['one_call_p50_ms']} ms (paced {limit.get('one_call_paced_p50_ms')} ms)")
        if lastmile is not None:
            proc, target, grpc_address = lastmile
            self._control(target, "POST", f"/v2/repository/models/{model}/load", {"parameters": entry["load_parameters"]})
            described = self._control(target, "GET", f"/lm/v1/models/{model}")
            entry["daemon_settings"] = {k: described["settings"].get(k) for k in BENCH_SETTINGS}  # what it runs with

            def stats(target: Target = target, model: str = model) -> dict:
                return self._control(target, "GET", f"/lm/v1/models/{model}")["batcher"]

            loads: dict[str, Load] = {
                "lastmile": HttpLoad(target, self.request_bytes(target, model, binary=True)),
                "lastmile-json": HttpLoad(target, self.request_bytes(target, model, binary=False)),
                "lastmile-grpc": GrpcLoad(grpc_address, grpc_request(*self.inputs(model), model), target.token),
            }
            if "lastmile-grpc" in self.servers:  # a fast row of wrong answers would be no figure
                entry["grpc_answers_match_http"] = self._answers_match(loads["lastmile"], loads["lastmile-grpc"])
                if not entry["grpc_answers_match_http"]:
                    self.progress(f"  lastmile-grpc: the answer differs from the binary HTTP one for {model}")
            for name in LASTMILE_SERVERS:
                if name in self.servers:
                    entry["servers"][name] = self.load_runs(name, loads[name], proc, stats)
            self._control(target, "POST", f"/v2/repository/models/{model}/unload", {})
        for name, start, binary in (("naive", self._start_naive, True), ("peer", self._start_peer, False)):
            if name in self.servers:
                target, proc = start(model, settings)
                try:
                    entry["servers"][name] = self.load_runs(name, HttpLoad(target, self.request_bytes(target, model, binary=binary)), proc)
                finally:
                    proc.stop()
        return entry

    @staticmethod
    def _answers_match(reference: Load, other: Load) -> bool:
        """One request through each (an idle model: both a batch of one), the same outputs."""
        loop = new_event_loop()
        try:
            want, got = loop.run_until_complete(reference.answer()), loop.run_until_complete(other.answer())
        finally:
            loop.close()
        return set(want) == set(got) and all(
            want[k].shape == got[k].shape and np.allclose(want[k], got[k], rtol=1e-6, atol=1e-6, equal_nan=True) for k in want)

    def _start_naive(self, model: str, settings: dict[str, Any]) -> tuple[Target, Proc]:
        argv = [sys.executable, "-m", "bench.naive", "--store", str(self.store), "--model", model, "--settings", json.dumps(settings)]
        if self.transport == "tcp":
            port = _free_port()
            target = Target(host="127.0.0.1", port=port)
            argv += ["--port", str(port)]
        else:
            path = str(self.tmp / f"naive-{model}.sock")
            target = Target(unix=path)
            argv += ["--socket", path]
        proc = Proc("naive", argv, self.tmp / f"naive-{model}.log")
        proc.wait_ready(target, "/v2/health/ready")
        return target, proc

    def _start_peer(self, model: str, settings: dict[str, Any]) -> tuple[Target, Proc]:
        port = _free_port()
        target = Target(host="127.0.0.1", port=port)  # LitServe listens on TCP only
        argv = [sys.executable, "-m", "bench.peer_litserve", "--store", str(self.store), "--model", model,
                "--settings", json.dumps({k: v for k, v in settings.items() if k not in ("max_batch_size", "max_delay_ms")}),
                "--port", str(port), "--max-batch-size", str(settings["max_batch_size"]),
                "--batch-timeout-ms", str(settings["max_delay_ms"])]
        proc = Proc("peer", argv, self.tmp / f"peer-{model}.log")
        proc.wait_ready(target, "/health")
        return target, proc

    @staticmethod
    def ratios(entry: dict[str, Any], generator_rps: float, grpc_generator_rps: float | None = None) -> None:
        """Every row against the limit; ``generator_bound`` against the capacity of the
        generator that row used (the gRPC one for ``lastmile-grpc``)."""
        limit = entry["limit"]
        best = limit["best_rows_per_s"]
        for name, runs in entry["servers"].items():
            gen_rps = grpc_generator_rps if name == "lastmile-grpc" else generator_rps
            for key, row in runs.items():
                row["vs_limit"] = round(row["rows_per_s"] / best, 4) if best else None
                batch = row.get("avg_batch_size")
                same = limit_at(limit, batch) if batch else None
                row["limit_same_batch_rows_per_s"] = round(same, 1) if same else None
                row["vs_limit_same_batch"] = round(row["rows_per_s"] / same, 4) if same else None
                if row.get("concurrency") == 1 and row.get("p50_ms") is not None:
                    row["added_p50_ms"] = round(row["p50_ms"] - limit["one_call_p50_ms"], 4)
                    if limit.get("one_call_paced_p50_ms") is not None:
                        row["added_p50_paced_ms"] = round(row["p50_ms"] - limit["one_call_paced_p50_ms"], 4)
                row["generator_bound"] = bool(gen_rps and row["throughput_rps"] > 0.5 * gen_rps)
                # What this machine's cores allow at this server's measured CPU per request
                # (server tree + load generator share them): no scheduling can beat it.
                cpu_us = (row.get("server_cpu_us") or 0) + (row.get("loadgen_cpu_us") or 0)
                row["cpu_ceiling_rps"] = round((os.cpu_count() or 1) * 1e6 / cpu_us, 1) if cpu_us else None
                row["cpu_ceiling_vs_limit"] = round(row["cpu_ceiling_rps"] / best, 4) if cpu_us and best else None

    def meta(self) -> dict[str, Any]:
        import importlib.metadata as md

        versions = {}
        for pkg in ("aiohttp", "onnxruntime", "torch", "deepspeed", "litserve", "uvloop", "numpy"):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
        return {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "versions": versions, "commit": commit, "loadavg_start": os.getloadavg(),
                "clients": self.clients, "duration_s": self.duration_s, "repeat": self.repeat, "transport": self.transport,
                "servers": self.servers, "defaults": self.defaults,
                "argv": sys.argv}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- output -------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """Markdown: per model, throughput at the largest client count and added latency at 1."""
    clients = result["meta"]["clients"]
    hi, lo = str(max(clients)), str(min(clients))
    servers = [s for s in SERVERS if s in result["meta"]["servers"]]
    head = ["model", "backend", "limit rows/s (batch)"] + [f"{s} @{hi} req/s (x limit)" for s in servers]
    head += [f"lastmile batch @{hi}", "lastmile x limit same batch", f"lastmile CPU us/req @{hi}: server + generator (ceiling x limit)",
             f"p50 ms @{lo}: limit (paced) / " + " / ".join(servers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, e in result["models"].items():
        lim = e["limit"]
        cells = [model, e["backend"] or "", f"{lim['best_rows_per_s']:.0f} ({lim['best_batch']})"]
        for s in servers:
            r = e["servers"].get(s, {}).get(hi)
            cells.append(f"{r['throughput_rps']:.0f} ({r['vs_limit']:.2f})" if r else "-")
        lm = e["servers"].get("lastmile", {}).get(hi, {})
        cells.append(f"{lm.get('avg_batch_size')}" if lm else "-")
        cells.append(f"{lm['vs_limit_same_batch']:.2f}" if lm.get("vs_limit_same_batch") else "-")
        cells.append(f"{lm['server_cpu_us']:.0f} + {lm['loadgen_cpu_us']:.0f} ({lm['cpu_ceiling_vs_limit']:.2f})" if lm.get("server_cpu_us") else "-")
        paced = lim.get("one_call_paced_p50_ms")
        p50s = [f"{lim['one_call_p50_ms']:.3f}" + (f" ({paced:.3f})" if paced is not None else "")]
        for s in servers:
            r = e["servers"].get(s, {}).get(lo)
            p50s.append(f"{r['p50_ms']:.3f}" if r and r.get("p50_ms") is not None else "-")
        cells.append(" / ".join(p50s))
        lines.append("| " + " | ".join(cells) + " |")
    gen = result.get("generator") or {}
    lines.append("")
    grpc_gen = result.get("generator_grpc")
    lines.append(f"Load generator alone against a canned-response server: {gen.get('throughput_rps', 0):.0f} req/s at "
                 f"{gen.get('concurrency')} clients" + (f" (gRPC: {grpc_gen['throughput_rps']:.0f} req/s)" if grpc_gen else "")
                 + f". Load average {result['meta']['loadavg_start'][0]:.1f} at the start.")
    if result["meta"].get("defaults"):
        lines.append("Every model loaded with no settings (--defaults): " + "; ".join(
            f"{m} {e.get('daemon_settings') or e['settings']}" for m, e in result["models"].items()) + ".")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    # `lastmile bench` runs this module as a child: its usage lines name the command typed
    prog = prog or os.environ.get("LASTMILE_BENCH_PROG") or "python -m bench"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated store names: any model of --store, and {HEAVY_MODEL} (a compute-heavy ONNX MLP, "
                        "built on first use) (default: the four demo models)")
    p.add_argument("--input-data", metavar="FILE", help="real inputs for every model: FILE.npz (one array per input) or FILE.json "
                   "({\"name\": [[...]]} or a V2 request); default: generated from each model's spec within its valid ranges")
    p.add_argument("--clients", default="1,64", help="closed-loop client counts (default 1,64)")
    p.add_argument("--duration-s", type=float, default=5.0, help="seconds measured per run (default 5)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    p.add_argument("--transport", default="unix", choices=["unix", "tcp"], help="how the load reaches Lastmile and the naive server")
    p.add_argument("--settings", default="{}", help='JSON settings for every model over the bench\'s tuned ones (threads=1, '
                   'max_delay_ms=0, the model\'s max_batch_size), e.g. \'{"max_delay_ms": 1}\'')
    p.add_argument("--defaults", action="store_true",
                   help="load every model with no settings at all: the daemon's defaults (what an operator gets out of the box; "
                        "threads auto, max_batch_size 8, max_delay_ms 2 unless the manifest says otherwise); the limit, naive "
                        "and peer use the same values. Not with --settings")
    p.add_argument("--store", help="model store (default: demo models built in a temp dir)")
    p.add_argument("--open-rate", type=float, help="also run open loop at this many requests/s")
    p.add_argument("--repeat", type=int, default=1, help="interleaved passes per model; the median pass is reported (noisy hosts)")
    p.add_argument("--out", help="write the raw JSON here (e.g. bench/results/last.json)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        print(f"bench: --settings must be a JSON object: {exc}", file=sys.stderr)
        return 2
    try:
        clients = [int(c) for c in args.clients.split(",") if c]
    except ValueError:
        print(f"bench: --clients: expected comma-separated integers, got {args.clients!r}", file=sys.stderr)
        return 2
    try:
        bench = Bench(models=[m for m in args.models.split(",") if m], clients=clients,
                      duration_s=args.duration_s, warmup_s=args.warmup_s, servers=[s for s in args.servers.split(",") if s],
                      transport=args.transport, settings=settings, store=Path(args.store) if args.store else None,
                      open_rate=args.open_rate, progress=(lambda m: print(m, file=sys.stderr, flush=True)), repeat=args.repeat,
                      input_data=args.input_data, defaults=args.defaults)
    except ValueError as exc:  # a bad --servers, --repeat, --clients or --defaults with --settings: one line, no traceback
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        return report(bench, args, table)
    except ValueError as exc:  # a model not in the store, inputs that do not fit it: one line
        print(f"bench: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_from_args(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
