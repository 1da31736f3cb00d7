"""A model that raises on some inputs: only those requests fail, never their batch-mates.

Token ids past the demo LM's vocabulary (256) pass protocol validation (they are valid INT64)
but make the model itself raise: ONNX Runtime's Gather and torch's embedding both refuse them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from lastmile.appliance.client.api import ApiError, LastmileClient
from tests.conftest import start_daemon

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("model", ["demo-lm", "demo-lm-ds"])
async def test_only_the_bad_requests_fail(demo_store: Path, tmp_path: Path, model: str) -> None:
    d = start_daemon(tmp_path / "d", demo_store)
    try:
        async with LastmileClient(d.socket) as client:
            await client.load(model, {"max_batch_size": 16, "max_delay_ms": 300.0})
            good = np.arange(8, dtype=np.int64).reshape(1, 8)
            bad = np.full((1, 8), 100_000, dtype=np.int64)
            inputs = [good, bad, good, good, bad, good]
            results = await asyncio.gather(
                *(client.infer(model, {"input_ids": x}, {"input_ids": "INT64"}) for x in inputs), return_exceptions=True
            )
            reference = None
            for x, result in zip(inputs, results):
                if x is bad:
                    assert isinstance(result, ApiError) and result.status == 500, result
                else:
                    assert not isinstance(result, BaseException), result
                    outputs, params = result
                    reference = outputs["logits"] if reference is None else reference
                    np.testing.assert_allclose(outputs["logits"], reference, rtol=1e-5, atol=1e-6)
            # ...and the model keeps serving afterwards
            outputs, _ = await client.infer(model, {"input_ids": good}, {"input_ids": "INT64"})
            assert outputs["logits"].shape == (1, 8, 256)
            assert (await client.model(model))["state"] == "ready"
    finally:
        d.stop()
