"""What a careless or hostile client can do to a live daemon, bounded.

Each test runs against a real daemon in a subprocess over its Unix socket (raw sockets where
the point is what the wire carries). One daemon serves the module, with small limits so each
limit is reached with few bytes: ``max_response_mb = 1``, header and body deadlines of 2 s,
``max_concurrent_requests = 4``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from lastmile.appliance.client.api import LastmileClient
from tests.conftest import DaemonProc, start_daemon

pytestmark = pytest.mark.faults

SERVER = "max_response_mb = 1\nheader_timeout_s = 2\nbody_timeout_s = 2\nmax_concurrent_requests = 4"
SECRET_KEY = "hunter2_do_not_echo"


@pytest.fixture(scope="module")
def store(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo store plus two folders a hostile operator-side user could plant: a
    ``model.toml`` linking out of the store, and a bare ``.pt2`` (no manifest)."""
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    shutil.copytree(demo_store, store)
    secret = root / "secret.toml"
    secret.write_text(f'{SECRET_KEY} = "x"\n')
    (store / "leak").mkdir()
    shutil.copy(store / "demo-mlp" / "model.onnx", store / "leak" / "model.onnx")
    (store / "leak" / "model.toml").symlink_to(secret)
    (store / "bare-pt2").mkdir()
    shutil.copy(store / "demo-mlp-ds" / "model.pt2", store / "bare-pt2" / "model.pt2")
    return store


@pytest.fixture(scope="module")
def daemon(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = start_daemon(tmp_path_factory.mktemp("d"), store, server_extra=SERVER)
    yield proc
    proc.stop()


async def _json(client: LastmileClient, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    status, _, payload = await client._raw(method, path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return status, json.loads(payload) if payload else {}


def _lm_request(batch: int, seq: int, *, outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [batch, seq], "data": [1] * (batch * seq)}]}
    if outputs is not None:
        body["outputs"] = outputs
    return body


# --- response amplification -----------------------------------------------------------


async def test_repeated_outputs_are_400_and_responses_are_capped(daemon: DaemonProc) -> None:
    async with LastmileClient(daemon.socket) as client:
        await client.load("demo-lm")
        # the same output asked for twice is refused, not served as many copies of the logits
        status, body = await _json(client, "POST", "/v2/models/demo-lm/infer", _lm_request(1, 8, outputs=[{"name": "logits"}] * 50))
        assert status == 400 and body["field"] == "outputs[1].name", body
        # 8 x 64 x 256 logits as JSON text: up to 3.2 MiB, over the 1 MiB cap: a 400 naming the cap
        status, body = await _json(client, "POST", "/v2/models/demo-lm/infer", _lm_request(8, 64))
        assert status == 400 and body["field"] == "outputs" and "server.max_response_mb" in body["error"], body
        # the same as binary output is 512 KiB: under the cap, served
        binary = _lm_request(8, 64, outputs=[{"name": "logits", "parameters": {"binary_data": True}}])
        status, headers, payload = await client._raw("POST", "/v2/models/demo-lm/infer", data=json.dumps(binary).encode())
        assert status == 200 and len(payload) > 8 * 64 * 256 * 4
        status, body = await _json(client, "POST", "/v2/models/demo-lm/infer", _lm_request(1, 8))
        assert status == 200 and body["outputs"][0]["shape"] == [1, 8, 256]


# --- zero-size dims with a huge batch -----------------------------------------------------


@pytest.mark.parametrize("shape", [[4611686018427387904, 0], [3, 0], [2**40, 1]])
async def test_zero_size_and_huge_dims_are_400(daemon: DaemonProc, shape: list[int]) -> None:
    async with LastmileClient(daemon.socket) as client:
        await client.load("demo-lm")
        # a 400 naming the shape, not a 500 with a NumPy traceback in the log (e.g. for [2**62, 0])
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": shape, "data": []}]}
        status, answer = await _json(client, "POST", "/v2/models/demo-lm/infer", body)
        assert status == 400 and answer["field"] == "inputs[0].shape", answer
        assert "Traceback" not in daemon.log_text()


# --- signatures read off the event loop, never torch in the daemon ---------------------------


def _libtorch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


async def test_listing_a_bare_pt2_never_blocks_the_loop_nor_imports_torch(daemon: DaemonProc, store: Path) -> None:
    """``bare-pt2`` was read at start-up (before READY); ``late-pt2`` appears while the daemon
    runs, so its first listing starts the reading in the background."""
    late = store / "late-pt2"
    late.mkdir()
    shutil.copy(store / "demo-mlp-ds" / "model.pt2", late / "model.pt2")
    async with LastmileClient(daemon.socket) as client:
        bare = next(r for r in (await client.models())["store"] if r["name"] == "bare-pt2")
        assert bare["error"] is None and bare["inputs"][0]["name"] == "input", bare
        slowest = 0.0
        stop = asyncio.Event()

        async def ping() -> None:
            nonlocal slowest
            while not stop.is_set():
                started = time.perf_counter()
                assert await client.ready()
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.01)

        pinger = asyncio.create_task(ping())
        rows: list[dict[str, Any]] = []
        pending = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # first answer: "being read"; then the signature
            rows = [r for r in (await client.models())["store"] if r["name"] == "late-pt2"]
            if rows and rows[0]["error"] is None:
                break
            assert rows and "being read" in rows[0]["error"], rows
            pending += 1
            await asyncio.sleep(0.2)
        stop.set()
        await pinger
        assert pending >= 1, "the first listing answered at once, without reading the signature on the loop"
        assert rows[0]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}], rows
        index = {r["name"]: r for r in await client.repository_index()}
        assert "late-pt2" in index and index["late-pt2"]["reason"] == ""
        # torch imported in the event loop would block it for seconds and stay mapped (~200 MB) for the daemon's life
        assert not _libtorch_mapped(daemon.proc.pid), "the daemon must never map libtorch"
        assert slowest < 1.0, f"health blocked {slowest:.2f} s while the store was listed"


# --- slow peers ---------------------------------------------------------------------------


async def _slow_peer(path: Path, payload: bytes) -> tuple[float, bytes]:
    """Send ``payload`` and nothing more; how long until the daemon cut us off, and what it said."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    started = time.monotonic()
    writer.write(payload)
    await writer.drain()
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(4096), 15):
            answer += chunk
    except (ConnectionError, asyncio.TimeoutError):
        pass
    writer.close()
    return time.monotonic() - started, answer


async def test_slow_peers_are_cut_off_and_hold_no_slots(daemon: DaemonProc) -> None:
    """20 peers that stop mid-headers and 20 that stop mid-body, with only 4 request slots:
    complete requests are still served meanwhile, and every slow peer is cut off within its
    deadline (2 s) plus slack: slow bodies hold no request slot, so infer never gets 503."""
    body = json.dumps(_lm_request(1, 4)).encode()
    half_headers = b"POST /v2/models/demo-lm/infer HTTP/1.1\r\nHost: x\r\nContent-Len"
    half_body = (b"POST /v2/models/demo-lm/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body)) + body[:10]
    async with LastmileClient(daemon.socket) as client:
        await client.load("demo-lm")
        slow = [asyncio.create_task(_slow_peer(daemon.socket, p)) for p in [half_headers] * 20 + [half_body] * 20]
        await asyncio.sleep(0.5)  # every slow peer is connected and stuck
        statuses = [(await client._raw("POST", "/v2/models/demo-lm/infer", data=body))[0] for _ in range(8)]
        assert statuses == [200] * 8, statuses
        results = await asyncio.gather(*slow)
    for seconds, answer in results:
        assert seconds < 2 + 3, f"a slow peer was kept {seconds:.1f} s"
    cut_bodies = [answer for _, answer in results[20:]]
    assert all(a.startswith(b"HTTP/1.1 408") or a == b"" for a in cut_bodies), cut_bodies[:2]
    assert any(a.startswith(b"HTTP/1.1 408") for a in cut_bodies)


# --- links out of the store ------------------------------------------------------------------


async def test_model_toml_linking_out_of_the_store_is_never_read(daemon: DaemonProc) -> None:
    async with LastmileClient(daemon.socket) as client:
        row = next(r for r in (await client.models())["store"] if r["name"] == "leak")
        assert "outside" in row["error"] and SECRET_KEY not in row["error"], row
        index = next(r for r in await client.repository_index() if r["name"] == "leak")
        assert "outside" in index["reason"] and SECRET_KEY not in index["reason"]
        status, body = await _json(client, "POST", "/v2/repository/models/leak/load", {})
        assert status in (400, 422) and "outside" in body["error"] and SECRET_KEY not in json.dumps(body), body
    assert SECRET_KEY not in daemon.log_text()


# --- a failed reload never takes the model down --------------------------------------------------


async def test_reload_with_a_missing_device_is_400_and_keeps_serving(daemon: DaemonProc) -> None:
    x = {"input": np.ones((1, 64), np.float32)}
    async with LastmileClient(daemon.socket) as client:
        await client.load("demo-mlp")
        pid = (await client.model("demo-mlp"))["runners"][0]["pid"]
        for device in ("cuda", "npu:3"):
            # refused up front (400) while the serving runner goes on: no 500, no model gone
            status, body = await _json(client, "POST", "/v2/repository/models/demo-mlp/load", {"parameters": {"device": device}})
            assert status == 400 and body["field"] == "parameters.device", body
            status, body = await _json(client, "PATCH", "/lm/v1/models/demo-mlp", {"settings": {"device": device}})
            assert status == 400 and body["field"] == "parameters.device", body
        status, body = await _json(client, "POST", "/v2/repository/models/demo-mlp/load", {"parameters": {"dtype": "bf16"}})
        assert status == 400 and body["field"] == "parameters.dtype", body
        out, _ = await client.infer("demo-mlp", x, {"input": "FP32"})
        assert out["logits"].shape == (1, 10)
        model = await client.model("demo-mlp")
        assert model["state"] == "ready" and model["runners"][0]["pid"] == pid, "the serving runner was never stopped"
        kinds = [e["kind"] for e in await client.events() if e.get("model") == "demo-mlp"]
        assert "reload_in_place" not in kinds and "load_failed" not in kinds, kinds


# --- unknown keys in a load body --------------------------------------------------------


async def test_load_body_with_unknown_keys_is_400(daemon: DaemonProc) -> None:
    async with LastmileClient(daemon.socket) as client:
        status, body = await _json(client, "POST", "/v2/repository/models/demo-mlp/load", {"parameter": {"max_batch_size": 2}})
        assert status == 400 and body["field"] == "parameter", body


# --- a stalled runner ---------------------------------------------------------------------


async def test_stopped_runner_is_detected_and_restarted(daemon: DaemonProc) -> None:
    x = {"input": np.ones((1, 64), np.float32)}
    async with LastmileClient(daemon.socket) as client:
        await client.load("demo-mlp-ts", {"timeout_s": 1.0})
        pid = (await client.model("demo-mlp-ts"))["runners"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            statuses = []
            for _ in range(4):
                status, _, _ = await client._raw("POST", "/v2/models/demo-mlp-ts/infer",
                                                 data=json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}).encode())
                statuses.append(status)
            assert 504 in statuses, statuses
            events = [e for e in await client.events() if e.get("model") == "demo-mlp-ts"]
            stalled = [e for e in events if e["kind"] == "runner_stalled"]
            assert stalled and "stopped" in stalled[0]["message"], events[-5:]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                model = await client.model("demo-mlp-ts")
                if model["state"] == "ready" and model["runners"] and model["runners"][0]["pid"] != pid:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail(f"not restarted: {model}")
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        out, _ = await client.infer("demo-mlp-ts", x, {"input": "FP32"})
        assert out["logits"].shape == (1, 10)
        kinds = [e["kind"] for e in await client.events() if e.get("model") == "demo-mlp-ts"]
        assert "runner_died" in kinds and "restarted" in kinds, kinds
