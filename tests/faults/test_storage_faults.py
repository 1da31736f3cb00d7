"""Storage faults under a running daemon: a full disk while writing state, the store directory
removed, corrupt and truncated artifacts. In each, what the client sees is a clear error, the
daemon keeps serving what it can, and no state file is ever half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lastmile.appliance.client.api import ApiError, LastmileClient
from tests.conftest import start_daemon

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
    try:
        async with LastmileClient(d.socket) as client:
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
    finally:
        d.stop()


async def test_store_removed_under_running_daemon(store_copy: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", store_copy)
    try:
        async with LastmileClient(d.socket) as client:
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
    finally:
        d.stop()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
async def test_corrupt_artifact_is_a_clear_load_error(store_copy: Path, tmp_path: Path, damage: str) -> None:
    for name, artifact in (("demo-mlp", "model.onnx"), ("demo-mlp-ds", "model.pt2")):
        path = store_copy / name / artifact
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x13\x37 not a model " * 100)
    d = start_daemon(tmp_path / "d", store_copy)
    try:
        async with LastmileClient(d.socket) as client:
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
    finally:
        d.stop()
