"""What the benchmark's servers share: loading any model of a store with the same backend and
session settings Lastmile's runner would use, its inputs, serving an app, reporting a run."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

Progress = Callable[[str], None]  # a bench's running commentary (stderr)


def prepare_env() -> None:
    """Same process environment as a Lastmile runner (before torch is imported)."""
    from lastmile.runtime.backends.threads import set_thread_env

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    set_thread_env()


def load_backend(store: str | Path, name: str, settings: dict[str, Any] | None = None) -> Any:
    """The model's backend, built exactly as a runner builds it (``create_backend``), with the
    manifest's settings overlaid by ``settings``."""
    prepare_env()
    from lastmile.models.settings import ModelSettings
    from lastmile.models.store import ModelStore
    from lastmile.runtime.backends import create_backend

    manifest = ModelStore(Path(store)).get(name)
    eff = ModelSettings().overlay(manifest.settings).overlay({"backend": manifest.backend, **(settings or {})})
    return create_backend(manifest, eff)


@functools.lru_cache(maxsize=None)
def manifest_of(store: str | Path, name: str) -> Any:
    """Read once per bench process: a bare ONNX file's signature costs ~0.13 s to read (100 MB
    heavy model), and every batch size and server asks for the same model's inputs."""
    from lastmile.models.store import ModelStore

    return ModelStore(Path(store)).get(name)


def backend_of(store: str | Path, name: str) -> str:
    """The backend a load with default settings picks (``auto`` resolved as the runner does)."""
    from lastmile.models.settings import ModelSettings
    from lastmile.runtime.backends import resolve_backend

    manifest = manifest_of(store, name)
    return resolve_backend(manifest, ModelSettings().overlay(manifest.settings))


def input_spec(store: str | Path, name: str) -> list[dict[str, Any]]:
    """The model's inputs as the store listing gives them (with ``range`` where known)."""
    from lastmile.appliance.server.textio import public_specs

    return [t.describe() for t in public_specs(manifest_of(store, name))[0]]


def inputs_for(store: str | Path, name: str, rows: int, seq: int = 16, input_data: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``rows`` rows of inputs for any model in the store: generated from its spec within the
    valid ranges, or the operator's ``input_data`` file with its rows repeated (or cut) to
    ``rows`` (the client's one input generator, ``lastmile.appliance.client.inputs``)."""
    from lastmile.appliance.client.inputs import load_input_data, random_inputs

    spec = input_spec(store, name)
    if input_data is None:
        return random_inputs(spec, rows=rows, seq=seq)
    arrays, types = load_input_data(input_data, spec)
    return {k: v[np.arange(rows) % v.shape[0]] for k, v in arrays.items()}, types


def default_max_batch(store: str | Path, name: str) -> int:
    """The manifest's max_batch_size, else 8 for a sequence model (a variable dim past the
    batch: rows cost more) and 32 for the rest."""
    manifest = manifest_of(store, name)
    if manifest.settings.get("max_batch_size"):
        return int(manifest.settings["max_batch_size"])
    return 8 if any(-1 in t["shape"][1:] for t in input_spec(store, name)) else 32


def serve_app(app: Any, socket: str | None, port: int) -> None:
    """Run an aiohttp app on a Unix socket (replacing a stale one) or on localhost:port."""
    from aiohttp import web

    if socket:
        if os.path.exists(socket):
            os.unlink(socket)
        web.run_app(app, path=socket, print=None, access_log=None)
    else:
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def report(bench: Any, args: Any, table: Callable[[dict[str, Any]], str]) -> int:
    """Run ``bench``, keep its JSON in ``--out``, print the table (or the JSON with ``--json``)."""
    import json

    try:
        result = bench.run()
    finally:
        bench.close()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0
