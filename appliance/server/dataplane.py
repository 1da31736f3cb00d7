"""The data plane: every decision the API's routes need, in one service the routes call.

A route decodes HTTP (path, query, JSON body), calls one method here and encodes the answer;
which model a name means, whether a version exists, what a settings change does (live or a
reload), what the repository index shows, how an infer request is checked against the
model's spec are decided here, once, for every route family that needs them (KServe V2,
Triton's repository extension, Lastmile's ``/lm/v1``, the monitor stream). MLServer splits
its REST layer the same way (``rest/endpoints.py`` -> ``handlers/dataplane.py``).

It raises :class:`~lastmile.appliance.server.http.ApiError` for what only this layer knows
(a version that is not served, a model that is in the store but not loaded) and lets the
rooms' own errors through; ``http.to_api_error`` maps both to status codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from lastmile.appliance.server.daemon import Daemon
from lastmile.appliance.server.http import ApiError
from lastmile.appliance.server.monitor_snapshot import SnapshotBuilder
from lastmile.appliance.server.textio import is_text_model, public_specs, text_infer
from lastmile.appliance.v2codec import InferRequest, decode_request
from lastmile.models.spec import TensorSpec
from lastmile.models.vocabulary import LIVE_KEYS
from lastmile.runtime.batcher import BatchInfo
from lastmile.runtime.manager import LoadedModel

SERVED_VERSION = "1"  # the store keeps one version of each model
EXTENSIONS = ("model_repository", "binary_tensor_data", "lastmile_v1")
UNKNOWN_MODEL_LABEL = "_unknown"  # the metrics label of a name that is neither loaded nor stored
REPOSITORY_STATES = {"ready": "READY", "loading": "LOADING", "unloading": "UNLOADING", "draining": "UNLOADING"}  # else UNAVAILABLE


@dataclass(frozen=True)
class InferResult:
    """One answered infer request: what the route needs to encode the V2 response."""

    model: str
    request: InferRequest
    outputs: dict[str, np.ndarray]
    output_specs: tuple[TensorSpec, ...]
    batch: BatchInfo


class DataPlane:
    """The daemon's manager, store, events and config behind the questions the API asks."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    # --- the server ---------------------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "lastmile", "version": self.daemon.version, "extensions": list(EXTENSIONS)}

    def server_ready(self) -> bool:
        return self.daemon.ready

    def status(self) -> dict[str, Any]:
        return self.daemon.summary()

    async def system(self) -> dict[str, Any]:
        return {**(await self.daemon.system_facts()), "daemon": self.daemon.summary()}

    def events(self, since: int, limit: int) -> list[dict[str, Any]]:
        return self.daemon.events.since(since, limit)

    def config(self) -> dict[str, Any]:
        cfg = self.daemon.config
        return {"file": str(cfg.file) if cfg.file else None, "values": cfg.as_dict(), "sources": cfg.sources}

    def monitor(self, since: int) -> SnapshotBuilder:
        """The snapshot builder of one monitor stream, resuming events after ``since``."""
        return SnapshotBuilder(self.daemon, since)

    def stopping(self) -> bool:
        return self.daemon.status == "stopping"

    # --- one model ----------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model ``name`` (at ``version``, when given), or a 404 that says whether
        the model is at least in the store and how to load it."""
        if version is not None and version != SERVED_VERSION:
            raise ApiError(404, f"model {name!r} has no version {version!r} (only version {SERVED_VERSION} is served)")
        model = self.daemon.manager.models.get(name)
        if model is None:
            hint = f" (it is in the store: load it with POST /v2/repository/models/{name}/load)" if name in self.daemon.store.names() else ""
            raise ApiError(404, f"model {name!r} is not loaded{hint}")
        return model

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        model = self.model(name, version)
        inputs, outputs = public_specs(model.manifest)  # a text model shows its derived text tensors
        return {
            "name": model.name,
            "versions": [SERVED_VERSION],
            "platform": f"{model.backend}_{model.manifest.format}",
            "inputs": [t.as_v2() for t in inputs],
            "outputs": [t.as_v2() for t in outputs],
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.model(name, version).state == "ready"

    def describe(self, name: str) -> dict[str, Any]:
        return self.daemon.manager.get(name).describe()

    async def infer(self, model: LoadedModel, header: dict[str, Any], binary: memoryview) -> InferResult:
        """Check a V2 request (its JSON header and binary part) against the model's spec and
        run it through the model's batcher; ``model`` comes from :meth:`model`."""
        manifest = model.manifest
        if is_text_model(manifest):  # text in (BYTES or token ids): lastmile.appliance.server.textio
            request, outputs, specs, batch = await text_infer(self.daemon.manager, model, header, binary)
            return InferResult(model.name, request, outputs, specs, batch)
        if not manifest.inputs or not manifest.outputs:
            raise ApiError(422, f"model {model.name!r} has no input/output spec: {' '.join(manifest.missing)}")
        decoded = decode_request(header, binary, manifest.inputs, [t.name for t in manifest.outputs])
        outputs, batch = await self.daemon.manager.infer(model.name, decoded.inputs)
        return InferResult(model.name, decoded, outputs, manifest.outputs, batch)

    def metric_label(self, name: str) -> str:
        """The model label of a request's metrics: its name only when it is loaded or stored,
        so a client cannot grow the label set with made-up names."""
        known = name in self.daemon.manager.models or name in self.daemon.store.names()
        return name if known else UNKNOWN_MODEL_LABEL

    # --- the repository -----------------------------------------------------------------------

    def repository_index(self, only_ready: bool) -> list[dict[str, str]]:
        """Triton's index: every model of the store with its state and, when it failed, why."""
        rows = []
        for entry in self.daemon.store.entries():
            model = self.daemon.manager.models.get(entry.name)
            state = REPOSITORY_STATES.get(model.state, "UNAVAILABLE") if model else "UNAVAILABLE"
            if only_ready and state != "READY":
                continue
            reason = entry.error or (model.error if model and model.error else "")
            rows.append({"name": entry.name, "version": SERVED_VERSION, "state": state, "reason": reason or ""})
        return rows

    def models(self) -> dict[str, Any]:
        """``GET /lm/v1/models``: the loaded models' rows and the store with each manifest."""
        store = []
        for entry in self.daemon.store.entries():
            manifest = entry.manifest
            inputs, outputs = public_specs(manifest) if manifest else ((), ())
            store.append(
                {
                    "name": entry.name,
                    "loaded": entry.name in self.daemon.manager.models,
                    "format": manifest.format if manifest else None,
                    "backend": manifest.backend if manifest else None,
                    "description": manifest.description if manifest else "",
                    "inputs": [t.describe() for t in inputs],
                    "outputs": [t.as_v2() for t in outputs],
                    # a Hugging Face folder: what was derived, from which file (lastmile.models.hf)
                    "text": manifest.hf.as_dict() if manifest and manifest.hf is not None else None,
                    "settings": manifest.settings if manifest else {},
                    "missing": list(manifest.missing) if manifest else [],
                    "error": entry.error,
                }
            )
        loaded = [m.describe() for m in self.daemon.manager.models.values()]
        return {"loaded": loaded, "store": store}

    async def load(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """Load (or reload with new settings); returns when the model serves."""
        return (await self.daemon.manager.load(name, parameters)).describe()

    async def unload(self, name: str, drain: bool = False) -> None:
        """Unload a model (``drain``: after its running work ended, see ``ModelManager.unload``);
        a model the state file lists but that failed to restore is forgotten instead (it is not
        loaded, so there is nothing to stop)."""
        daemon = self.daemon
        if name not in daemon.manager.models and name in daemon.unrestored:
            del daemon.unrestored[name]
            daemon.save_state()
            return
        await daemon.manager.unload(name, drain=drain)

    async def change_settings(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a settings patch: every value is checked before anything changes; keys the
        vocabulary marks live go to the batcher at once, any other key reloads the model
        with its current overrides plus the changes."""
        manager = self.daemon.manager
        model = manager.get(name)
        model.settings.overlay(changes)  # validate everything before changing anything
        if set(changes) <= set(LIVE_KEYS):
            return manager.configure(name, changes).describe()
        return (await manager.load(name, {**model.overrides, **changes})).describe()


def dataplane_of(request: web.Request) -> DataPlane:
    """The app's data plane (built with the app in ``server.build_app``)."""
    return request.app["dataplane"]
