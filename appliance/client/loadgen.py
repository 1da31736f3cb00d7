"""A lean HTTP/1.1 load generator over asyncio streams (Unix socket or TCP), keep-alive.

Why not aiohttp's client: on a 2-core box the generator competes with the server for CPU,
and aiohttp's client costs ~150 µs of Python per request, about what the server under test
spends. Here each request is a pre-encoded byte string written as is; a response costs one
``readuntil`` for the headers, a ``Content-Length`` scan and one ``readexactly`` for the body
(never parsed), so the generator's own cost is a few tens of µs per request. With uvloop
(installed with the peer framework) when importable. :func:`generator_capacity` measures
what the generator can do against a canned-response server, so a benchmark can prove the
generator is not what it measured.

Two modes:

- **closed loop**: ``concurrency`` connections, each sends its next request as soon as the
  previous answer arrived (throughput at a fixed number of clients);
- **open loop**: requests start at a fixed ``rate`` (per second) whatever the answers do, over
  a pool of connections (latency at a fixed arrival rate; late starts are counted as
  ``lag``, so a saturated generator shows up instead of silently lowering the rate).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import numpy as np

T = TypeVar("T")



@dataclass(frozen=True)
class Target:
    """Where requests go: ``unix`` path, or ``host``/``port`` (TCP), with an optional token."""

    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix:
            reader, writer = await asyncio.open_unix_connection(self.unix, limit=1 << 22)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    def describe(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"tcp:{self.host}:{self.port}"


def http_request(target: Target, method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 request (keep-alive) as bytes."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
    if target.token:
        lines.append(f"Authorization: Bearer {target.token}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one response (``Content-Length`` framing: every server here sends it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    i = low.find(b"\r\ncontent-length:")  # not "inference-header-content-length:"
    if i < 0:
        raise ConnectionError("response without Content-Length")
    j = low.index(b"\r\n", i + 2)
    length = int(head[i + 17 : j])
    body = await reader.readexactly(length) if length else b""
    return status, body


@dataclass
class Result:
    """What one load run measured; latencies in ms."""

    mode: str
    target: str
    concurrency: int
    rate: float | None
    duration_s: float
    requests: int
    errors: int
    rows_per_request: int
    throughput_rps: float
    rows_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    lag_p99_ms: float | None = None  # open loop: how late requests started
    error_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(mode: str, target: Target, concurrency: int, rate: float | None, elapsed: float, lat: list[float],
              errors: int, rows: int, samples: list[str], lags: list[float] | None = None) -> Result:
    arr = np.asarray(lat) * 1000.0 if lat else None

    def pct(p: float, a: np.ndarray | None = arr) -> float | None:
        return round(float(np.percentile(a, p)), 4) if a is not None and len(a) else None

    n = len(lat)
    lag = np.asarray(lags) * 1000.0 if lags else None
    return Result(
        mode=mode, target=target.describe(), concurrency=concurrency, rate=rate, duration_s=round(elapsed, 3),
        requests=n, errors=errors, rows_per_request=rows,
        throughput_rps=round(n / elapsed, 2) if elapsed > 0 else 0.0,
        rows_per_s=round(n * rows / elapsed, 2) if elapsed > 0 else 0.0,
        p50_ms=pct(50), p95_ms=pct(95), p99_ms=pct(99),
        max_ms=round(float(arr.max()), 4) if arr is not None else None,
        mean_ms=round(float(arr.mean()), 4) if arr is not None else None,
        lag_p99_ms=pct(99, lag) if lag is not None else None,
        error_samples=samples[:5],
    )


class ConnectionLost(Exception):
    """A closed-loop client's connection is gone: the error is counted and that client stops."""


#: One request of a closed-loop client: None when it was answered, else its error sample;
#: raises :class:`ConnectionLost` when the client cannot go on.
Exchange = Callable[[], Awaitable[str | None]]


async def closed_window(exchanges: list[Exchange], *, duration_s: float, warmup_s: float,
                        on_measure: Callable[[], None] | None = None) -> tuple[float, list[float], int, list[str]]:
    """Each exchange in a loop, one request at a time, for ``duration_s`` after ``warmup_s``
    (warm-up answers are not counted; ``on_measure`` is called when the measured window opens):
    the measured seconds, the latencies, the errors and up to 5 error samples. The one closed
    loop of every protocol (HTTP here, gRPC in ``bench.run``)."""
    if on_measure is not None:
        asyncio.get_running_loop().call_later(warmup_s, on_measure)
    lat: list[float] = []
    errors = 0
    samples: list[str] = []
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker(exchange: Exchange) -> None:
        nonlocal errors
        append = lat.append
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                failed = await exchange()
            except ConnectionLost as exc:
                errors += 1
                samples.append(str(exc))
                return
            t1 = clock()
            if t0 >= measure_from:
                if failed is not None:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(failed)
                else:
                    append(t1 - t0)

    await asyncio.gather(*(worker(e) for e in exchanges))
    return clock() - measure_from, lat, errors, samples


def _http_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Exchange:
    write = writer.write

    async def exchange() -> str | None:
        write(request)
        try:
            status, body = await read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise ConnectionLost(f"connection: {exc!r}") from None
        return f"HTTP {status}: {body[:200].decode(errors='replace')}" if status >= 400 else None

    return exchange


async def closed_loop(target: Target, request: bytes, *, concurrency: int, duration_s: float, warmup_s: float = 0.5,
                      rows: int = 1, on_measure: Callable[[], None] | None = None) -> Result:
    """``concurrency`` keep-alive connections, each one request at a time, for ``duration_s``
    after ``warmup_s`` (see :func:`closed_window`)."""
    conns = [await target.connect() for _ in range(concurrency)]
    try:
        elapsed, lat, errors, samples = await closed_window([_http_exchange(r, w, request) for r, w in conns],
                                                            duration_s=duration_s, warmup_s=warmup_s, on_measure=on_measure)
    finally:
        for _, w in conns:
            w.close()
    return summarize("closed", target, concurrency, None, elapsed, lat, errors, rows, samples)


async def open_loop(target: Target, request: bytes, *, rate: float, duration_s: float, max_connections: int = 256,
                    rows: int = 1) -> Result:
    """Requests start every ``1/rate`` s for ``duration_s``; each takes a free connection
    (opening one, up to ``max_connections``; beyond that the start waits and counts as lag)."""
    free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0
    sem = asyncio.Semaphore(max_connections)
    lat: list[float] = []
    lags: list[float] = []
    errors = 0
    samples: list[str] = []
    clock = time.perf_counter
    interval = 1.0 / rate
    n = max(1, int(rate * duration_s))
    tasks: list[asyncio.Task] = []

    async def one(due: float) -> None:
        nonlocal errors, opened
        async with sem:
            if free:
                conn = free.pop()
            else:
                opened += 1
                conn = await target.connect()
            reader, writer = conn
            t0 = clock()
            lags.append(t0 - due)
            writer.write(request)
            try:
                status, body = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                errors += 1
                samples.append(f"connection: {exc!r}")
                writer.close()
                return
            t1 = clock()
            free.append(conn)
            if status >= 400:
                errors += 1
                if len(samples) < 5:
                    samples.append(f"HTTP {status}: {body[:200].decode(errors='replace')}")
            else:
                # latency from when the request was due: queueing in the generator counts
                lat.append(t1 - due)

    start = clock()
    for i in range(n):
        due = start + i * interval
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    for _, w in free:
        w.close()
    result = summarize("open", target, 0, rate, elapsed, lat, errors, rows, samples, lags)
    result.extra["connections"] = opened
    return result


# --- proving the generator is not the bottleneck ---------------------------------------------


async def _canned_server(path: str, body: bytes) -> asyncio.AbstractServer:
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)) + body

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                i = head.lower().find(b"content-length:")
                length = int(head[i + 15 : head.index(b"\r\n", i)]) if i >= 0 else 0
                if length:
                    await reader.readexactly(length)
                writer.write(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path, limit=1 << 22)


async def generator_capacity(request: bytes, response_body: bytes, *, concurrency: int = 64, duration_s: float = 1.0,
                             path: str | None = None) -> Result:
    """Closed-loop throughput of this generator against a canned-response server on a Unix
    socket in the same process (the server is as cheap as a server can be, so this is a
    lower bound of the generator's own ceiling)."""
    import os
    import tempfile

    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="lm-gen-")
        path = os.path.join(tmp, "canned.sock")
    server = await _canned_server(path, response_body)
    try:
        return await closed_loop(Target(unix=path), request, concurrency=concurrency, duration_s=duration_s, warmup_s=0.2)
    finally:
        server.close()
        await server.wait_closed()
        if tmp:
            try:
                os.unlink(path)
                os.rmdir(tmp)
            except OSError:
                pass


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (lower per-request cost), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]
