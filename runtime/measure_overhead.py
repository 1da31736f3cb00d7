"""Measure what a runner costs beyond its weights, per backend, on this machine.

``python -m lastmile.runtime.measure_overhead [--mb 64]`` builds the demo models and a synthetic MLP of
about ``--mb`` MB (ONNX and torch.export) in a temporary store, starts a real runner for each
(from the same forkserver the daemon uses), and prints, at "ready": the runner's USS (what
unloading gives back), RSS, VM size, the weights the estimator reads from the artifact, and
``overhead = USS - weights`` and ``factor = (USS_big - USS_small) / (weights_big - weights_small)``.
Those figures are what :mod:`lastmile.runtime.estimate` uses (docs/memory.md records a run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from lastmile.models.manifest import write_manifest
from lastmile.models.spec import Manifest, TensorSpec

MB = 1024 * 1024


def build_big_mlp(store: Path, name: str, mb: int, fmt: str = "onnx") -> Path:
    """A ``[-1, 512] -> [-1, 512]`` MLP whose fp32 weights take about ``mb`` MB (square 1024
    layers, 4 MB each), as ``onnx`` or ``torch_export``, with its ``model.toml``."""
    import torch

    layers = max(1, round(mb / 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        mods: list[Any] = [torch.nn.Linear(512, 1024)]
        for _ in range(layers - 1):
            mods += [torch.nn.ReLU(), torch.nn.Linear(1024, 1024)]
        mods += [torch.nn.ReLU(), torch.nn.Linear(1024, 512)]
        module = torch.nn.Sequential(*mods).eval()
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 512)
    if fmt == "onnx":
        artifact = folder / "model.onnx"
        torch.onnx.export(module, (example,), str(artifact), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
        backend = "onnxruntime"
    else:
        from torch.export import Dim

        artifact = folder / "model.pt2"
        program = torch.export.export(module, (example,), dynamic_shapes={"input": {0: Dim("batch", min=1, max=4096)}})
        torch.export.save(program, str(artifact))
        backend = "deepspeed"
    manifest = Manifest(
        name=name, path=folder, format=fmt, artifact=artifact, backend=backend,
        inputs=(TensorSpec("input", "FP32", (-1, 512)),), outputs=(TensorSpec("output", "FP32", (-1, 512)),),
        settings={"max_batch_size": 8}, description=f"synthetic {mb} MB MLP",
    )
    (folder / "model.toml").write_text(write_manifest(manifest))
    return folder


def proc_memory(pid: int) -> dict[str, int]:
    """USS/RSS/VM/peak RSS of ``pid`` from ``/proc`` (smaps_rollup and status)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Private_Clean", "Private_Dirty", "Swap"):
                out[key] = int(rest.split()[0]) * 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmSize", "VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) * 1024
    out["uss"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


async def _measure(store: Path, names: list[str]) -> list[dict[str, Any]]:
    from lastmile.models.settings import ModelSettings
    from lastmile.models.store import ModelStore
    from lastmile.runtime.backends import resolve_backend
    from lastmile.runtime.estimate import artifact_weights
    from lastmile.runtime.forkserver import warm_up
    from lastmile.runtime.runner import Runner
    from lastmile.runtime.shm import BufferPool

    await asyncio.get_running_loop().run_in_executor(None, warm_up)
    st = ModelStore(store)
    rows = []
    for name in names:
        manifest = st.get(name)
        settings = ModelSettings().overlay(manifest.settings).overlay({"backend": manifest.backend})
        backend = resolve_backend(manifest, settings)
        pool = BufferPool(f"lastmile-{os.getpid()}-m-{name}-")
        runner = Runner(manifest, settings, pool=pool)
        await runner.start()
        mem = proc_memory(runner.pid)
        weights = artifact_weights(manifest).at(settings.dtype)
        rows.append({"model": name, "backend": backend, "format": manifest.format, "weights": weights,
                     "uss": mem["uss"], "rss": mem["Rss"], "vm": mem["VmSize"], "overhead": mem["uss"] - weights})
        await runner.stop()
        pool.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="size of the synthetic MLP (MB of fp32 weights)")
    args = parser.parse_args(argv)
    from lastmile.models.demo import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        build_demo(store)
        build_big_mlp(store, "big-onnx", args.mb, "onnx")
        build_big_mlp(store, "big-ds", args.mb, "torch_export")
        rows = asyncio.run(_measure(store, ["demo-mlp", "demo-lm", "big-onnx", "demo-mlp-ds", "demo-lm-ds", "demo-mlp-ts", "big-ds"]))
    print(f"{'model':<12} {'backend':<12} {'format':<13} {'weights MB':>10} {'USS MB':>8} {'RSS MB':>8} {'VM MB':>8} {'overhead MB':>11}")
    for r in rows:
        print(f"{r['model']:<12} {r['backend']:<12} {r['format']:<13} {r['weights'] / MB:>10.2f} {r['uss'] / MB:>8.1f} "
              f"{r['rss'] / MB:>8.1f} {r['vm'] / MB:>8.1f} {r['overhead'] / MB:>11.1f}")
    by = {r["model"]: r for r in rows}
    for small, big in (("demo-mlp", "big-onnx"), ("demo-mlp-ds", "big-ds")):
        dw = by[big]["weights"] - by[small]["weights"]
        du = by[big]["uss"] - by[small]["uss"]
        print(f"weight factor {by[big]['backend']}: {du / dw:.3f} resident bytes per weight byte ({big} vs {small})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
