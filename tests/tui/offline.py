"""The TUI without a daemon: an app whose monitor stream is fed by the test (synthetic
snapshots shaped like ``/lm/v1/monitor``'s) and a client that answers the few calls the
screens make from canned data. For layout and wording checks at 80x24 and 120x40 that need
no real model (and no 10 s daemon start on 2 cores)."""

from __future__ import annotations

import copy
import time
from typing import Any

from lastmile.appliance.client.api import DaemonNotRunning
from lastmile.tui.app import LastmileApp
from lastmile.tui.messages import ConnectionChanged, SnapshotArrived

SIZES = [(80, 24), (120, 40)]
SIZE_IDS = ["80x24", "120x40"]


def tensor_row(name: str = "demo-mlp", **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name, "state": "ready", "phase": "ready", "error": None, "backend": "onnxruntime", "format": "onnx",
        "device": "cpu",
        "settings": {"max_batch_size": 8, "max_delay_ms": 2.0, "max_queue": 1024, "graph_fusion": "basic", "threads": 1,
                     "dtype": "fp32", "device": "cpu", "memory_limit_mb": None},
        "overrides": {}, "backend_info": {"device": "cpu"},
        "runners": [{"instance": 0, "pid": 4242, "alive": True, "batches": 10, "backend_s": 0.5}],
        "loaded_at": time.time() - 60, "last_used": time.time(), "restarts": 0, "requests": 120, "failures": 0,
        "last_error": None, "latency_ms": {"p50": 1.25, "p95": 2.5, "p99": 3.75}, "queue_depth": 0,
        "batcher": {"avg_batch_size": 2.0, "queue_depth": 0}, "memory": {"used_bytes": 30 * 2**20},
        "requests_per_s": 12.0, "failures_per_s": 0.0, "rss_bytes": 30 * 2**20, "memory_limit_mb": None, "avg_batch_size": 2.0,
    }
    row.update(extra)
    return row


def generation_row(name: str = "demo-chat", *, legacy: bool = False, **extra: Any) -> dict[str, Any]:
    """A causal LM served as token streams: no batcher figures (``requests_per_s`` 0 between
    streams, no request latency), the engine's and the API's figures under ``generation``.
    The manifest asked for deepspeed fp32; the runner reports ORT-GenAI int4 (``runs``).

    ``legacy``: as a daemon from before the flat names described it (``backend_info``, the
    engine's ``ttft_s`` summaries in seconds, the monitor's ``generation.api``)."""
    row = tensor_row(name, backend="deepspeed", format="hf", requests=3, requests_per_s=0.0,
                     latency_ms={"p50": None, "p95": None, "p99": None}, avg_batch_size=1.0,
                     settings={**tensor_row()["settings"], "dtype": "fp32"})
    row["backend_info"] = {"device": "cpu", "engine": "ort-genai", "precision": "int4", "generation": True}
    gen: dict[str, Any] = {
        "engine": "ort-genai", "precision": "int4", "max_num_seqs": 4, "max_context": 2048,
        "running": 1, "waiting": 2, "kv_used_bytes": 12 * 2**20, "kv_reserved_bytes": 96 * 2**20,
        "generated_tokens_total": 640,
        "ttft_s": {"count": 3, "p50": 0.120, "p90": 0.2, "p99": 0.250, "max": 0.3},
        "inter_token_s": {"count": 600, "p50": 0.021, "p90": 0.03, "p99": 0.045, "max": 0.05},
    }
    if legacy:
        gen["api"] = {"generated_tokens_per_s": 42.5, "prompt_tokens_per_s": 0.0, "ttft_ms": {"p50": 130.0, "p99": 260.0},
                      "inter_token_ms": {"p50": 22.0, "p99": 46.0}, "active_streams": 1}
    else:
        row["runs"] = {"engine": "ort-genai", "precision": "int4", "device": "cpu", "dtype": "int4"}
        row["runs_text"] = "ort-genai int4 on cpu"
        gen.update({"tokens_per_s": 42.5, "streams_per_s": 0.2, "streams_active": 1, "ttft_p50_ms": 130.0, "ttft_p99_ms": 260.0,
                    "inter_token_p50_ms": 22.0, "inter_token_p99_ms": 46.0})
        row.update({"rate_per_s": 42.5, "rate_unit": "tokens/s", "p50_ms": 22.0, "p50_of": "inter_token"})
    row["generation"] = gen
    row.update(extra)
    return row


def snapshot(rows: list[dict[str, Any]], seq: int = 0) -> dict[str, Any]:
    return {
        "type": "snapshot", "seq": seq, "time": time.time(), "rate_hz": 1.0,
        "host": {"cpu_percent": 12.0, "cpu_count": 2, "ram_total_bytes": 8 * 2**30, "ram_used_bytes": 2 * 2**30,
                 "ram_available_bytes": 6 * 2**30, "ram_percent": 25.0, "daemon_rss_bytes": 100 * 2**20},
        "accelerators": [],
        "daemon": {"version": "0.0-test", "status": "ready", "ready": True, "uptime_s": 75, "pid": 999, "models_loaded": len(rows),
                   "socket": "/tmp/offline.sock"},
        "models": copy.deepcopy(rows),
        "events": [],
    }


STORE = [
    {"name": "demo-mlp", "format": "onnx", "backend": "onnxruntime", "loaded": True, "description": "a small MLP classifier for the demo",
     "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}], "settings": {}},
    {"name": "demo-lm", "format": "onnx", "backend": "onnxruntime", "loaded": False,
     "description": "a tiny transformer language model over token ids",
     "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}, {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
     "settings": {"max_batch_size": 16}},
]


class OfflineClient:
    """The calls the screens make, answered from canned data; ``calls`` records them."""

    where = "/tmp/offline.sock"

    def __init__(self, store: list[dict[str, Any]] | None = None, loaded: list[dict[str, Any]] | None = None) -> None:
        self.store = store if store is not None else STORE
        self.loaded = loaded or []
        self.calls: list[tuple[str, Any]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise DaemonNotRunning("the daemon is not running")

    async def close(self) -> None:
        pass

    async def models(self) -> dict[str, Any]:
        self._check()
        return {"store": copy.deepcopy(self.store), "loaded": copy.deepcopy(self.loaded)}

    async def system(self) -> dict[str, Any]:
        self._check()
        return {"accelerators": {"devices": ["cpu"]}}

    async def metadata(self, name: str) -> dict[str, Any]:
        self._check()
        return {"name": name, "platform": "onnxruntime_onnx", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]}

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        self._check()
        self.calls.append((path, body))
        if path == "/lm/v1/memory/estimate":
            return {"model": body["model"], "fits": False,
                    "estimate": {"total_bytes": 40 * 2**20, "device": "cpu", "backend": "onnxruntime",
                                 "parts": {"weights_bytes": 20 * 2**20, "limit_machinery_bytes": 2 * 2**20}},
                    "free_bytes": {"cpu": 10 * 2**20},
                    "shortfall": {"reason": "memory_limit", "device": "cpu", "needed_bytes": 40 * 2**20, "free_bytes": 10 * 2**20,
                                  "limit_bytes": 20 * 2**20},
                    "options": [{"option": "raise_limit", "settings": {"memory_limit_mb": 47}, "estimate_bytes": 40 * 2**20,
                                 "description": "raise memory_limit_mb to 47"}]}
        raise AssertionError(f"unexpected request {method} {path}")

    async def model(self, name: str) -> dict[str, Any]:
        self._check()
        return tensor_row(name)

    async def infer(self, name: str, inputs: dict[str, Any], datatypes: dict[str, str], *, binary: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        import numpy as np

        self._check()
        rows = next(iter(inputs.values())).shape[0]
        return ({"output": np.arange(rows * 10, dtype=np.float32).reshape(rows, 10)},
                {"client_ms": 1.5, "total_ms": 1.2, "queue_ms": 0.2, "compute_ms": 0.9, "batch_id": 7, "batch_size": rows})

    async def tune(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        self._check()
        self.calls.append(("tune", (name, settings)))
        row = tensor_row(name)
        row["settings"].update(settings)
        return row


class OfflineApp(LastmileApp):
    """The app with no monitor stream of its own: the test calls :meth:`feed` and :meth:`lose`."""

    def __init__(self, client: OfflineClient | None = None, **kwargs: Any) -> None:
        super().__init__(client or OfflineClient(), **kwargs)  # type: ignore[arg-type]

    def stream(self, rate_hz: float) -> None:  # type: ignore[override]
        """No daemon: snapshots come from :meth:`feed`."""

    def feed(self, rows: list[dict[str, Any]], seq: int = 0) -> None:
        self.client.loaded = copy.deepcopy(rows)  # type: ignore[attr-defined]  # /lm/v1/models agrees with the stream
        self.client.down = False  # type: ignore[attr-defined]
        self.post_message(SnapshotArrived(snapshot(rows, seq)))

    def lose(self, error: str = "the daemon is not running") -> None:
        self.client.down = True  # type: ignore[attr-defined]  # every call fails as on a dead socket
        self.post_message(ConnectionChanged({"connection": "lost", "error": error, "attempt": 1, "retry_in_s": 0.5}))
