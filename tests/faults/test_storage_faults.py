"""Storage faults under a running daemon: a full disk while writing state, the store directory
removed, corrupt and truncated artifacts. In each, what the client sees is a clear error, the
daemon keeps serving what it can, and no state file is ever half-written."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lastmile.appliance.client.api import ApiError
from tests.conftest import DaemonProc, client_then_stop, socket_answers, start_daemon, write_config

pytestmark = pytest.mark.faults
X = {"input": np.ones((1, 64), np.float32)}
FP32 = {"input": "FP32"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that really fills up (needs root and mount, else skipped)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_disk_full_while_writing_state_keeps_old_state(demo_store: Path, tmp_path: Path, small_disk: Path) -> None:
    state = small_disk / "state.json"
    d = start_daemon(tmp_path / "d", demo_store, state_file=state)
    async with client_then_stop(d) as client:
        await client.load("demo-mlp")
        assert json.loads(state.read_text())["models"] == {"demo-mlp": {}}
        filler = small_disk / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        await client.load("demo-mlp-ds")  # the load works; only saving it fails
        failed = [e for e in await client.events() if e["kind"] == "state_write_failed"]
        assert failed and "No space left" in failed[0]["message"]
        assert json.loads(state.read_text())["models"] == {"demo-mlp": {}}, "old state intact"
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "state.json"], "no temp file left behind"
        out, _ = await client.infer("demo-mlp-ds", X, FP32)
        assert out["logits"].shape == (1, 10)
        filler.unlink()
        await client.unload("demo-mlp-ds")
        assert json.loads(state.read_text())["models"] == {"demo-mlp": {}}


async def test_store_removed_under_running_daemon(store_copy: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", store_copy)
    async with client_then_stop(d) as client:
        await client.load("demo-mlp")
        shutil.rmtree(store_copy)
        out, _ = await client.infer("demo-mlp", X, FP32)  # loaded models keep serving
        assert out["logits"].shape == (1, 10)
        with pytest.raises(ApiError) as info:
            await client.load("demo-lm")
        assert info.value.status == 404 and "not found" in info.value.message
        assert (await client.models())["store"] == []
        assert await client.repository_index() == []
        assert (await client.status())["ready"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
async def test_corrupt_artifact_is_a_clear_load_error(store_copy: Path, tmp_path: Path, damage: str) -> None:
    for name, artifact in (("demo-mlp", "model.onnx"), ("demo-mlp-ds", "model.pt2")):
        path = store_copy / name / artifact
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x13\x37 not a model " * 100)
    d = start_daemon(tmp_path / "d", store_copy)
    async with client_then_stop(d) as client:
        await client.load("demo-lm")
        for name in ("demo-mlp", "demo-mlp-ds"):
            with pytest.raises(ApiError) as info:
                await client.load(name)
            assert info.value.status in (422, 500)
            assert name in info.value.message or "model" in info.value.message.lower()
            assert "Traceback" not in info.value.message
            assert name not in {m["name"] for m in (await client.models())["loaded"]}
        failed = [e for e in await client.events() if e["kind"] == "load_failed"]
        assert len(failed) == 2
        out, _ = await client.infer("demo-lm", {"input_ids": np.zeros((1, 4), np.int64)}, {"input_ids": "INT64"})
        assert out["logits"].shape == (1, 4, 256), "the other model is untouched"


async def test_state_write_is_retried_until_it_succeeds(demo_store: Path, tmp_path: Path, small_disk: Path) -> None:
    """After a disk-full period the daemon rewrites the state file by itself once there is room
    again, so a restart keeps the model loaded meanwhile; an entry that is not an object is
    reported with a ``state_entry_invalid`` event, not dropped without a word."""
    state = small_disk / "state.json"
    state.write_text(json.dumps({"version": 1, "models": {"demo-mlp": {}, "not-an-object": 5}}))
    d = start_daemon(tmp_path / "d", demo_store, state_file=state)
    async with client_then_stop(d) as client:
        events = await client.events()
        invalid = [e for e in events if e["kind"] == "state_entry_invalid"]
        assert invalid and "not-an-object" in invalid[0]["message"] and "int" in invalid[0]["message"], events
        assert (await client.model("demo-mlp"))["state"] == "ready"
        filler = small_disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        await client.load("demo-mlp-ts")
        assert any(e["kind"] == "state_write_failed" for e in await client.events())
        assert "demo-mlp-ts" not in json.loads(state.read_text())["models"]
        filler.unlink()  # space is back; nothing else changes, the daemon retries by itself
        deadline = time.monotonic() + 15
        while "demo-mlp-ts" not in json.loads(state.read_text())["models"]:
            assert time.monotonic() < deadline, "state never rewritten after the disk had room again"
            await asyncio.sleep(0.2)
        assert json.loads(state.read_text())["models"] == {"demo-mlp": {}, "demo-mlp-ts": {}}
        assert any(e["kind"] == "state_written" for e in await client.events())


def _start_with_small_shm(home: Path, store: Path, size: str) -> DaemonProc:
    """A daemon in its own mount namespace whose /dev/shm is a ``size`` tmpfs (root only)."""
    home.mkdir(parents=True, exist_ok=True)
    config = write_config(home, store)
    log = home / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LASTMILE_", "NOTIFY_SOCKET", "LISTEN_"))}
    env["HOME"] = str(home)
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec {sys.executable} -m lastmile.appliance.client.cli serve --config {config}"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    d = DaemonProc(proc, home / "run" / "lastmile.sock", config, home, log)
    deadline = time.monotonic() + 120
    while not socket_answers(d.socket):
        if proc.poll() is not None:
            pytest.skip(f"cannot run a daemon with a private /dev/shm here: {d.log_text()[-300:]}")
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.1)
    return d


async def test_shm_exhaustion_is_507_with_an_event(demo_store: Path, tmp_path: Path) -> None:
    """/dev/shm too small for a batch's buffers: HTTP 507 and a ``shm_exhausted`` event, and
    smaller requests are still served."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /dev/shm")
    d = _start_with_small_shm(tmp_path / "d", demo_store, "256k")
    async with client_then_stop(d) as client:
        await client.load("demo-lm")
        small = {"input_ids": np.ones((1, 8), np.int64)}
        out, _ = await client.infer("demo-lm", small, {"input_ids": "INT64"})
        assert out["logits"].shape == (1, 8, 256)
        big = {"input_ids": np.ones((8, 64), np.int64)}  # 512 KiB of logits: more than /dev/shm has
        with pytest.raises(ApiError) as info:
            await client.infer("demo-lm", big, {"input_ids": "INT64"})
        assert info.value.status == 507 and "shared memory" in info.value.message, info.value
        events = [e for e in await client.events() if e["kind"] == "shm_exhausted"]
        assert events and events[0]["model"] == "demo-lm"
        out, _ = await client.infer("demo-lm", small, {"input_ids": "INT64"})  # still serving
        assert out["logits"].shape == (1, 8, 256)
        assert "Traceback" not in d.log_text()
