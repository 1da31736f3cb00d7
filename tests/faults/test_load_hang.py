"""A model whose load hangs: the load times out, its runner is killed, the error is clear, and
nothing else is affected. The hang is real: a trusted pickle whose unpickling sleeps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from lastmile.appliance.client.api import ApiError, LastmileClient
from tests.conftest import start_daemon

pytestmark = pytest.mark.faults


class _SleepOnLoad:
    def __reduce__(self) -> tuple:
        return (time.sleep, (3600,))


def _hanging_model(store: Path) -> None:
    folder = store / "hangs"
    folder.mkdir()
    torch.save(_SleepOnLoad(), folder / "model.pt")
    (folder / "model.toml").write_text(
        'format = "torch_pickle"\nartifact = "model.pt"\ntrust_pickle = true\n'
        '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 4]\n'
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 4]\n'
    )


async def test_hanging_load_times_out_and_kills_the_runner(store_copy: Path, tmp_path: Path) -> None:
    _hanging_model(store_copy)
    d = start_daemon(tmp_path / "d", store_copy)
    try:
        async with LastmileClient(d.socket) as client:
            await client.load("demo-mlp")
            before = {p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)}
            started = time.monotonic()
            with pytest.raises(ApiError) as info:
                await client.load("hangs", {"load_timeout_s": 3.0})
            assert time.monotonic() - started < 20
            assert info.value.status == 504
            assert info.value.message == "loading hangs took longer than 3 s; runner process killed"
            assert "hangs" not in {m["name"] for m in (await client.models())["loaded"]}
            after = {p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)}
            assert after <= before, f"the hung runner is gone: new processes {after - before}"
            out, _ = await client.infer("demo-mlp", {"input": np.ones((1, 64), np.float32)}, {"input": "FP32"})
            assert out["logits"].shape == (1, 10)
            assert any(e["kind"] == "load_failed" and e["model"] == "hangs" for e in await client.events())
    finally:
        d.stop()
