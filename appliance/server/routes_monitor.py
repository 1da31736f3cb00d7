"""``GET /lm/v1/monitor``: the live monitoring stream (a WebSocket) the TUI's dashboard draws from.

One JSON snapshot per tick, at the rate the client asks for (``?rate_hz=``, 0.1..20, default 1;
a running client may send ``{"rate_hz": x}`` to change it without reconnecting). What a
snapshot holds is :mod:`.monitor_snapshot`'s, handed out by the data plane; this module owns
the socket and the ticks. ``?since=N`` resumes the event stream after a reconnect.

Why a push stream rather than the TUI polling ``/lm/v1/models``: one connection, deltas computed
where the counters live (requests/s is exact, not two polls' guess), and events arrive with
the figures they explain. The stream ends by itself when the daemon stops (close code 1001),
so a graceful stop never waits on idle monitors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import WSMsgType, web

from lastmile.appliance.server.dataplane import dataplane_of
from lastmile.appliance.server.generation_metrics import MonitorAnnotator
from lastmile.appliance.server.http import ApiError
from lastmile.appliance.server.routes_generate import GENERATION_METRICS

routes = web.RouteTableDef()

MIN_RATE_HZ, MAX_RATE_HZ, DEFAULT_RATE_HZ = 0.1, 20.0, 1.0
STOP_POLL_S = 0.1  # how often a sleeping stream checks that the daemon is stopping


def parse_rate(value: Any, field: str = "rate_hz") -> float:
    """A rate in Hz within the allowed range, or :class:`ApiError` 400 naming ``field``."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{field} must be a number of snapshots per second from {MIN_RATE_HZ} to {MAX_RATE_HZ}; got {value!r}", field=field) from None
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:  # also refuses nan and inf
        raise ApiError(400, f"{field} must be from {MIN_RATE_HZ} to {MAX_RATE_HZ} snapshots per second; got {value!r}", field=field)
    return rate


@routes.get("/lm/v1/monitor")
async def monitor(request: web.Request) -> web.StreamResponse:
    plane = dataplane_of(request)
    rate = parse_rate(request.query.get("rate_hz", DEFAULT_RATE_HZ))
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        raise ApiError(400, f"since must be an integer event seq; got {request.query.get('since')!r}", field="since") from None
    ws = web.WebSocketResponse(heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "GET /lm/v1/monitor is a WebSocket: connect with an 'Upgrade: websocket' request (rate_hz, since)", field="Upgrade")
    await ws.prepare(request)
    state = {"rate_hz": rate}
    wake = asyncio.Event()
    reader = asyncio.get_running_loop().create_task(_read_commands(ws, state, wake))
    builder = plane.monitor(since)
    generation = request.app.get(GENERATION_METRICS)  # tokens/s, TTFT, inter-token of the generation routes
    annotator = MonitorAnnotator(generation) if generation is not None else None
    try:
        while not ws.closed and not reader.done():
            started = time.monotonic()
            snapshot = await builder.build(state["rate_hz"])
            if annotator is not None:
                annotator.annotate(snapshot)
            await ws.send_str(json.dumps(snapshot, default=str))
            deadline = started + 1.0 / state["rate_hz"]
            while not ws.closed and not reader.done():
                if plane.stopping():
                    await ws.close(code=1001, message=b"daemon stopping")
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(left, STOP_POLL_S))
                if wake.is_set():  # a new rate: the next tick is due one new period after the last
                    deadline = started + 1.0 / state["rate_hz"]
    except ConnectionResetError:
        pass  # the client went away between two ticks
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        if not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
    return ws


async def _read_commands(ws: web.WebSocketResponse, state: dict[str, float], wake: asyncio.Event) -> None:
    """Client messages: ``{"rate_hz": x}`` changes the rate; anything wrong gets an error frame."""
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            body = json.loads(msg.data)
            if not isinstance(body, dict) or "rate_hz" not in body:
                raise ApiError(400, 'messages must be JSON objects like {"rate_hz": 2}', field="rate_hz")
            state["rate_hz"] = parse_rate(body["rate_hz"])
            wake.set()
        except (ValueError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else f"message is not JSON: {exc}"
            await ws.send_str(json.dumps({"type": "error", "error": message, "field": "rate_hz"}))
