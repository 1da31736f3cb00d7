"""A reload that has to stop the serving runners first (no room for both)
and then fails to start leaves the model serving with its previous settings.

Real manager, real runner processes (DeepSpeed on CPU). One thing is forced: "no room to run
both while switching" (``_fits_beside`` returns False), which on this machine's budget would
otherwise need a host tuned to the byte; that is the branch under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lastmile.models.settings import ModelSettings
from lastmile.models.store import ModelStore
from lastmile.runtime.events import EventLog
from lastmile.runtime.manager import ModelManager

pytestmark = pytest.mark.faults


async def test_in_place_reload_that_fails_rolls_back(demo_store: Path) -> None:
    events = EventLog()
    manager = ModelManager(ModelStore(demo_store), ModelSettings(), events)
    try:
        await manager.load("demo-mlp-ds")
        manager._fits_beside = lambda est: False  # type: ignore[method-assign]  # see the module docstring
        # tp_size 2 passes every check a load can make up front and fails when the runner starts
        with pytest.raises(Exception) as info:
            await manager.load("demo-mlp-ds", {"tp_size": 2})
        assert "tp_size" in str(info.value)
        model = manager.get("demo-mlp-ds")  # still loaded (ModelNotLoaded here would mean the failed reload took it down)
        assert model.state == "ready" and model.settings.tp_size == 1
        out, _ = await manager.infer("demo-mlp-ds", {"input": np.ones((2, 64), np.float32)})
        assert out["logits"].shape == (2, 10)
        kinds = [e["kind"] for e in events.since(0, 500)]
        assert kinds.index("reload_in_place") < kinds.index("load_failed") < kinds.index("reload_rolled_back"), kinds
    finally:
        await manager.close()
