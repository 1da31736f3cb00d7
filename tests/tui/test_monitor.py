"""``GET /lm/v1/monitor`` over the real socket of a real daemon: the rate is honoured, a bad rate
is a 400 naming ``rate_hz``, snapshots carry models and events, and the client side raises on
a refused rate instead of retrying forever."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest

from lastmile.appliance.client.api import ApiError, LastmileClient
from lastmile.appliance.client.monitor import monitor
from tests.appliance.test_api import check_against_spec
from tests.conftest import DaemonProc, get_error


async def _collect(socket: str, query: str, seconds: float) -> list[dict]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket)) as session:
        async with session.ws_connect(f"http://lastmile/lm/v1/monitor?{query}") as ws:
            out: list[dict] = []
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await ws.receive(timeout=left)
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                out.append(json.loads(msg.data))
            return out


async def test_rate_is_honoured(tui_daemon: DaemonProc) -> None:
    fast = await _collect(str(tui_daemon.socket), "rate_hz=10", 2.0)
    slow = await _collect(str(tui_daemon.socket), "rate_hz=2", 2.0)
    default = await _collect(str(tui_daemon.socket), "", 2.2)
    # first snapshot at once, then one per period: 10 Hz -> ~21, 2 Hz -> ~5, 1 Hz -> ~3 (2 cores, loose)
    assert 12 <= len(fast) <= 24, len(fast)
    assert 3 <= len(slow) <= 6, len(slow)
    assert 2 <= len(default) <= 4, len(default)
    assert all(s["type"] == "snapshot" and s["rate_hz"] == 10 for s in fast)
    assert [s["seq"] for s in fast] == list(range(len(fast)))
    host = fast[-1]["host"]
    assert 0 <= host["cpu_percent"] <= 100 and 0 < host["ram_used_bytes"] < host["ram_total_bytes"]
    assert fast[-1]["daemon"]["ready"] is True and isinstance(fast[-1]["accelerators"], list)
    memory = fast[-1]["memory"]  # the memory governor's budgets and watermarks
    assert memory["devices"]["host"]["limit_bytes"] > 0 and 0 < memory["config"]["low_watermark"] < memory["config"]["high_watermark"]


@pytest.mark.parametrize("rate", ["0", "0.05", "21", "abc", "nan", "inf", ""])
async def test_bad_rate_is_400_naming_rate_hz(tui_daemon: DaemonProc, rate: str) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(tui_daemon.socket))) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
            await session.ws_connect(f"http://lastmile/lm/v1/monitor?rate_hz={rate}")
        assert failed.value.status == 400
        async with session.get(f"http://lastmile/lm/v1/monitor?rate_hz={rate}") as resp:  # the body, as a plain GET sees it
            body = await resp.read()
            assert resp.status == 400
            assert json.loads(body)["field"] == "rate_hz"
            assert "rate_hz" in json.loads(body)["error"]
            check_against_spec("GET", "/lm/v1/monitor", resp.status, resp.headers["Content-Type"], body)


async def test_plain_get_without_upgrade_is_400(tui_daemon: DaemonProc) -> None:
    status, error = await get_error(tui_daemon.socket, "/lm/v1/monitor?rate_hz=1")
    assert status == 400 and "WebSocket" in error


async def test_models_requests_per_s_and_events_arrive(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        stream = monitor(client, 10)
        first = await anext(stream)
        assert first["type"] == "snapshot"
        history = {e["seq"] for e in first["events"]}
        await client.load("demo-mlp")
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        kinds: list[str] = []
        busiest = 0.0
        deadline = time.monotonic() + 15
        async for snap in stream:
            assert "connection" not in snap, snap
            kinds += [e["kind"] for e in snap["events"] if e["seq"] not in history]
            row = next((m for m in snap["models"] if m["name"] == "demo-mlp"), None)
            if row is not None:
                assert {"requests_per_s", "latency_ms", "queue_depth", "avg_batch_size", "rss_bytes", "state", "backend"} <= set(row)
                busiest = max(busiest, row["requests_per_s"])
                await asyncio.gather(*(client.infer("demo-mlp", {"input": x}, {"input": "FP32"}) for _ in range(10)))
            if ("loaded" in kinds and busiest > 0) or time.monotonic() > deadline:
                break
        await stream.aclose()
    assert "load_started" in kinds and "loaded" in kinds, kinds
    assert busiest > 0
    # events are not repeated across snapshots of one stream
    assert len(kinds) == len(set(kinds)) or kinds.count("loaded") == 1


async def test_rate_can_change_on_a_live_stream(tui_daemon: DaemonProc) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(tui_daemon.socket))) as session:
        async with session.ws_connect("http://lastmile/lm/v1/monitor?rate_hz=0.2") as ws:
            await ws.receive(timeout=5)  # the first snapshot comes at once
            await ws.send_str(json.dumps({"rate_hz": 20}))
            got = json.loads((await ws.receive(timeout=2)).data)  # a 5 s period would time out here
            assert got["rate_hz"] == 20
            await ws.send_str(json.dumps({"rate_hz": 99}))
            for _ in range(40):
                msg = json.loads((await ws.receive(timeout=2)).data)
                if msg["type"] == "error":
                    assert msg["field"] == "rate_hz" and "99" in msg["error"]
                    break
            else:
                raise AssertionError("no error frame for rate_hz=99")


async def test_client_refuses_a_bad_rate_at_once(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        with pytest.raises(ApiError) as failed:
            await asyncio.wait_for(anext(monitor(client, 100)), 5)
        assert failed.value.field == "rate_hz"
