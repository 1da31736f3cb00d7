"""Measure what a runner costs beyond its weights, per backend, on this machine.

``python -m lastmile.runtime.memory.measure_overhead [--mb 64]`` builds the demo models and a synthetic MLP of
about ``--mb`` MB (ONNX and torch.export) in a temporary store, starts a real runner for each
(from the same forkserver the daemon uses), and prints, at "ready": the runner's USS (what
unloading gives back), RSS, VM size, the weights the estimator reads from the artifact, and
``overhead = USS - weights`` and ``factor = (USS_big - USS_small) / (weights_big - weights_small)``.
Those figures are what :mod:`lastmile.runtime.memory.estimate` uses (docs/memory.md records a run).
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
from lastmile.runtime.memory import procfs
from lastmile.runtime.memory.units import MiB as MB


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


async def _measure(store: Path, names: list[str], limit_mb: int | None = None) -> list[dict[str, Any]]:
    from lastmile.models.settings import ModelSettings
    from lastmile.models.store import ModelStore
    from lastmile.runtime.backends import resolve_backend
    from lastmile.runtime.memory.estimate import artifact_weights
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
        row: dict[str, Any] = {"model": name, "backend": backend, "format": manifest.format}
        for limited in ((False, True) if limit_mb else (False,)):
            run_settings = settings.overlay({"memory_limit_mb": limit_mb}) if limited else settings
            pool = BufferPool(f"lastmile-{os.getpid()}-m-{name}-")
            runner = Runner(manifest, run_settings, pool=pool)
            await runner.start()
            mem = procfs.read_proc_memory(runner.pid)
            await runner.stop()
            pool.close()
            if limited:
                row["uss_limited"] = mem["uss"]
                continue
            weights = artifact_weights(manifest).at(settings.dtype)
            row.update(weights=weights, uss=mem["uss"], rss=mem["rss"], vm=mem["vm"], overhead=mem["uss"] - weights)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="size of the synthetic MLP (MiB of fp32 weights)")
    parser.add_argument("--limit-mb", type=int, default=0,
                        help="also start each model with this memory_limit_mb: the cost of the limit's machinery")
    parser.add_argument("--models", default="", help="comma-separated subset of the models")
    args = parser.parse_args(argv)
    from lastmile.models.demo import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        build_demo(store)
        build_big_mlp(store, "big-onnx", args.mb, "onnx")
        build_big_mlp(store, "big-ds", args.mb, "torch_export")
        names = [n for n in args.models.split(",") if n] or ["demo-mlp", "demo-lm", "big-onnx", "demo-mlp-ds", "demo-lm-ds", "demo-mlp-ts", "big-ds"]
        rows = asyncio.run(_measure(store, names, args.limit_mb or None))
    print(f"{'model':<12} {'backend':<12} {'format':<13} {'weights MiB':>11} {'USS MiB':>8} {'RSS MiB':>8} {'VM MiB':>8} "
          f"{'overhead MiB':>12}" + (f" {'USS limited':>11} {'machinery':>9}" if args.limit_mb else ""))
    for r in rows:
        line = (f"{r['model']:<12} {r['backend']:<12} {r['format']:<13} {r['weights'] / MB:>11.2f} {r['uss'] / MB:>8.1f} "
                f"{r['rss'] / MB:>8.1f} {r['vm'] / MB:>8.1f} {r['overhead'] / MB:>12.1f}")
        if "uss_limited" in r:
            line += f" {r['uss_limited'] / MB:>11.1f} {(r['uss_limited'] - r['uss']) / MB:>+9.1f}"
        print(line)
    by = {r["model"]: r for r in rows}
    for small, big in (("demo-mlp", "big-onnx"), ("demo-mlp-ds", "big-ds")):
        if small not in by or big not in by:
            continue
        dw = by[big]["weights"] - by[small]["weights"]
        du = by[big]["uss"] - by[small]["uss"]
        print(f"weight factor {by[big]['backend']}: {du / dw:.3f} resident bytes per weight byte ({big} vs {small})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
