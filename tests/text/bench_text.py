"""Texts per second through the daemon (V2 text infer, 1 and 32 concurrent clients) against the
same model called in-process with the same tokenizer, in the same run; DeepSpeed (the HF
folder) and ONNX Runtime (its ``lastmile models import --to onnx`` export). Not a test: run

    .venv/bin/python -m tests.text.bench_text [--seconds 5] [--passes 3]

The model has MiniLM-L6's shape (hidden 384, 6 layers, 12 heads, FFN 1536; random weights,
built here); each request is one ~20-word sentence. Passes alternate daemon/in-process and the
backends, and the medians are printed, since the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SENTENCE = "The temperature sensor on line four reported an error while the backup sensor shows normal values again today"


def in_process(folder: Path, backend: str, threads: int, batch: int, seconds: float) -> float:
    """Texts/s of tokenizer + model + pooling in this process, ``batch`` texts per call."""
    from tokenizers import Tokenizer

    from lastmile.runtime.backends.text import normalize, pool

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(128)
    texts = [SENTENCE] * batch
    if backend == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])

        def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        model = transformers.AutoModel.from_pretrained(str(folder)).eval()

        def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()

    def once() -> None:
        enc = tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        normalize(pool(run(ids, mask), mask, ("mean",)))

    for _ in range(3):
        once()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        once()
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    from lastmile.appliance.client.loadgen import Target, closed_loop, http_request, run
    from lastmile.models.demo_text import build_encoder_folder
    from lastmile.models.hf_onnx import export_hf_to_onnx
    from tests.conftest import start_daemon

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-text-"))
    store = work / "store"
    started = time.perf_counter()
    build_encoder_folder(store / "enc", hidden=384, layers=6, heads=12, intermediate=1536, max_length=128)
    print(f"built the MiniLM-L6-shaped folder in {time.perf_counter() - started:.1f} s")
    report = export_hf_to_onnx(store / "enc", store / "enc-onnx")
    print(f"ONNX export: {json.dumps(report.as_dict())}")
    daemon = start_daemon(work / "home", store)
    results: dict[str, list[float]] = {}
    try:
        import httpx2 as httpx

        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://l", timeout=600)
        threads = {}
        for name in ("enc", "enc-onnx"):
            r = http.post(f"/v2/repository/models/{name}/load", json={"parameters": {"max_batch_size": 32, "max_delay_ms": 2}})
            r.raise_for_status()
            threads[name] = r.json()["backend_info"].get("threads") or r.json()["backend_info"].get("intra_op_threads") or 1
        print(f"runner threads: {threads}")
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [SENTENCE]}]}).encode()
        target = Target(unix=str(daemon.socket))
        for p in range(args.passes):
            for name, backend in (("enc", "deepspeed"), ("enc-onnx", "onnxruntime")):
                request = http_request(target, "POST", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"})
                for clients in (1, 32):
                    res = run(closed_loop(target, request, concurrency=clients, duration_s=args.seconds, warmup_s=1.0))
                    if res.errors:
                        print(f"  {name} {clients} clients: {res.errors} errors, e.g. {res.error_samples[:1]}")
                    results.setdefault(f"daemon {backend} {clients} clients", []).append(res.throughput_rps)
                folder = store / name
                for batch in (1, 32):
                    results.setdefault(f"in-process {backend} batch {batch}", []).append(
                        in_process(folder, backend, int(threads[name]), batch, args.seconds))
            print(f"pass {p + 1}: " + json.dumps({k: round(v[-1], 1) for k, v in results.items()}))
    finally:
        daemon.stop()
    print("medians (texts/s):")
    for key, values in results.items():
        print(f"  {key:<36} {statistics.median(values):8.1f}   passes {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
