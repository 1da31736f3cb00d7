"""models/signatures.py: one read per file version, off the event loop when asked from it."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from lastmile.models.errors import FormatError
from lastmile.models.signatures import SignaturePending, SignatureReader
from lastmile.models.spec import TensorSpec

SIG = ((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 1)),), ())


def test_cached_per_file_version_and_errors_remembered(tmp_path: Path) -> None:
    calls: list[str] = []

    def compute(fmt: str, artifact: Path):  # noqa: ANN202 - a stand-in for the forkserver read
        calls.append(artifact.read_text())
        if artifact.read_text() == "bad":
            raise FormatError("corrupt")
        return SIG

    reader = SignatureReader(compute)
    artifact = tmp_path / "m.onnx"
    artifact.write_text("good")
    assert reader("onnx", artifact) == SIG and reader("onnx", artifact) == SIG
    assert calls == ["good"]
    artifact.write_text("bad")
    os.utime(artifact, ns=(1, 1))  # a new version even within the mtime granularity
    for _ in range(3):
        with pytest.raises(FormatError):
            reader("onnx", artifact)
    assert calls == ["good", "bad"], "a corrupt file is read once per version"
    reader.close()


async def test_on_the_event_loop_a_miss_is_pending_not_a_wait(tmp_path: Path) -> None:
    gate = threading.Event()

    def compute(fmt: str, artifact: Path):  # noqa: ANN202
        gate.wait(10)
        return SIG

    reader = SignatureReader(compute)
    artifact = tmp_path / "m.pt2"
    artifact.write_text("x")
    with pytest.raises(SignaturePending):
        reader("torch_export", artifact)  # returns at once although compute is blocked
    gate.set()
    for _ in range(100):
        try:
            assert reader("torch_export", artifact) == SIG
            break
        except SignaturePending:
            await asyncio.sleep(0.02)
    else:
        pytest.fail("never read")
    assert reader.computed == 1
    reader.close()
