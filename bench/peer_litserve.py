"""The peer: LitServe (PyPI ``litserve``, dynamic batching) serving the same model with the
same backend and session settings (our ``create_backend``, so the ONNX Runtime session or the
DeepSpeed engine is identical), V2-shaped JSON in and out (LitServe's own request format is
JSON; it has no binary tensor extension).

``python -m bench.peer_litserve --store DIR --model NAME --port N [--max-batch-size 8]
[--batch-timeout-ms 2] [--settings JSON]``

LitServe's layout: a uvicorn API process and an inference worker process joined by queues;
requests are batched in the worker up to ``max_batch_size`` or ``batch_timeout``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from bench.common import prepare_env

prepare_env()  # before LitServe imports torch


import litserve as ls


class V2Api(ls.LitAPI):
    """One model behind LitServe (module level: LitServe pickles it into its worker)."""

    def __init__(self, store: str, model: str, settings: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store, self.model, self.settings = store, model, settings

    def setup(self, device: str) -> None:
        from bench.common import load_backend
        from lastmile.models.spec import V2_TO_NUMPY
        from lastmile.models.store import ModelStore

        self.manifest = ModelStore(self.store).get(self.model)
        self.backend = load_backend(self.store, self.model, self.settings)
        self.dtypes = {t.name: V2_TO_NUMPY[t.datatype] for t in self.manifest.inputs}
        self.out_types = {t.name: t.datatype for t in self.manifest.outputs}

    def decode_request(self, request: dict) -> dict[str, np.ndarray]:
        out = {}
        for tensor in request["inputs"]:
            name = tensor["name"]
            out[name] = np.asarray(tensor["data"], dtype=self.dtypes[name]).reshape(tensor["shape"])
        return out

    def batch(self, inputs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        rows = [next(iter(x.values())).shape[0] for x in inputs]
        return {"rows": rows, "inputs": {n: np.concatenate([x[n] for x in inputs]) for n in inputs[0]}}

    def predict(self, batch: Any) -> Any:
        if isinstance(batch, dict) and "rows" in batch:
            return {"rows": batch["rows"], "outputs": self.backend.run(batch["inputs"])}
        return {"rows": [next(iter(batch.values())).shape[0]], "outputs": self.backend.run(batch)}

    def unbatch(self, output: Any) -> list[dict[str, np.ndarray]]:
        parts, offset = [], 0
        for n in output["rows"]:
            parts.append({k: v[offset:offset + n] for k, v in output["outputs"].items()})
            offset += n
        return parts

    def encode_response(self, output: Any) -> dict[str, Any]:
        if isinstance(output, dict) and "outputs" in output:  # unbatched path (max_batch_size 1)
            output = self.unbatch(output)[0]
        return {"model_name": self.model, "outputs": [
            {"name": k, "datatype": self.out_types.get(k, "FP32"), "shape": list(v.shape), "data": v.reshape(-1).tolist()}
            for k, v in output.items()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    prepare_env()
    api = V2Api(args.store, args.model, json.loads(args.settings), max_batch_size=args.max_batch_size,
                batch_timeout=args.batch_timeout_ms / 1000, api_path=f"/v2/models/{args.model}/infer")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
