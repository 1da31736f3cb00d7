"""The client side of ``GET /lm/v1/monitor``: an endless async iterator of snapshots that rides
out daemon restarts.

Why here and not in the TUI: scripts want the same stream, and reconnection is subtle enough
to write once. When the connection drops (daemon stopped, restarted, socket gone) the iterator
yields one ``{"connection": "lost", ...}`` marker, retries with back-off, and yields
``{"connection": "restored", ...}`` before the first snapshot of the new connection, so a UI
can show and clear a banner without ever seeing an exception. Event numbering resumes from
the last event seen (the daemon starts from scratch when it was restarted).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator
from urllib.parse import urlencode

import aiohttp

from lastmile.appliance.client.api import ApiError, LastmileClient

BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 3.0)  # a restarted daemon is usually back within seconds


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, (FileNotFoundError, ConnectionRefusedError)):
            return "the daemon is not running"
        if isinstance(os_error, PermissionError):
            return "permission denied on the socket"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the daemon refused the stream (HTTP {exc.status})"
    text = str(exc) or type(exc).__name__
    return text


async def monitor(client: LastmileClient, rate_hz: float = 1.0) -> AsyncIterator[dict[str, Any]]:
    """Snapshots of ``/lm/v1/monitor`` at ``rate_hz``, forever, with connection markers.

    A bad ``rate_hz`` raises :class:`ApiError` (400, field ``rate_hz``) at once instead of
    retrying: it would never succeed. Every other failure becomes a ``lost`` marker (the first
    of an outage) or a ``retrying`` one (each further failed try), carrying ``error`` (why),
    ``attempt`` and ``retry_in_s`` (when the next try is).
    """
    if client._session is None:
        await client.__aenter__()
    since = 0
    attempt = 0
    lost = False
    while True:
        query = urlencode({"rate_hz": rate_hz, "since": since})
        error: str
        try:
            assert client._session is not None
            receive_timeout = max(10.0, 5.0 / rate_hz)  # a daemon that stops talking is lost
            async with client._session.ws_connect(
                f"{client.base_url}/lm/v1/monitor?{query}", timeout=aiohttp.ClientWSTimeout(ws_receive=receive_timeout, ws_close=2.0),
                heartbeat=None, autoping=True,
            ) as ws:
                attempt = 0
                if lost:
                    lost = False
                    yield {"connection": "restored", "where": client.where, "time": time.time()}
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") == "snapshot":
                            if data.get("events"):
                                since = data["events"][-1]["seq"]
                        yield data
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                error = "the daemon closed the stream" + (f" ({ws.close_code})" if ws.close_code else "")
                if ws.close_code == 1001:
                    error = "the daemon is stopping"
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 400:
                raise ApiError(400, f"the daemon refused rate_hz={rate_hz!r}", "rate_hz") from None
            error = _describe(exc)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            error = _describe(exc)
        delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        attempt += 1
        yield {"connection": "retrying" if lost else "lost", "error": error, "where": client.where, "attempt": attempt, "retry_in_s": delay, "time": time.time()}
        lost = True
        await asyncio.sleep(delay)

