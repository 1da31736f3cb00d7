"""The daemon's state shared by all routes: config, store, model manager, events, and the
persistence of what is loaded."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil

from lastmile.appliance import __version__
from lastmile.appliance.server.config import Config, ConfigError, load_config
from lastmile.appliance.server.statefile import StateError, read_state_report, write_state
from lastmile.models.errors import FormatError
from lastmile.models.signatures import Signature, SignatureReader
from lastmile.models.store import ModelStore
from lastmile.runtime.errors import LoadError
from lastmile.runtime.events import EventLog
from lastmile.runtime.manager import ModelManager

logger = logging.getLogger("lastmile.daemon")
STATE_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # back-off between retries of a failed state write


def signature_in_forkserver(fmt: str, artifact: Path) -> Signature:
    """An artifact's signature read in a forkserver child: the daemon never imports torch
    (a ``.pt2``) nor holds a parsed ONNX graph for a listing."""
    from lastmile.runtime.forkserver import call_in_forkserver

    try:
        return call_in_forkserver("lastmile.models.formats", "infer_signature", fmt, artifact, timeout_s=120.0)
    except LoadError as exc:
        raise FormatError(str(exc).split(" failed: ", 1)[-1]) from None


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = __version__
        self.started_at = time.time()
        self.events = EventLog()
        self.signatures = SignatureReader(signature_in_forkserver)
        self.store = ModelStore(config.store["models_dir"], read_signature=self.signatures)
        self.manager = ModelManager(self.store, config.defaults, self.events, on_change=self.save_state, memory=dict(config.memory))
        # measured footprints per artifact, kept beside the state file for the next admission
        self.manager.governor.footprints.open(Path(config.store["state_file"]).with_name("footprints.json"))
        self.ready = False
        self.status = "starting"
        self._system: dict[str, Any] | None = None
        self.unrestored: dict[str, dict[str, Any]] = {}  # in the state file, failed to restore
        self._state_failures = 0  # failed writes in a row
        self._state_retry: asyncio.TimerHandle | None = None
        self.grpc: Any = None  # the KServe V2 gRPC server (grpc_service.py) once started

    async def start_grpc(self, app: Any) -> None:
        """The gRPC listeners beside the HTTP sites, on the same event loop and data plane."""
        from lastmile.appliance.server.grpc_service import start_grpc

        self.grpc = await start_grpc(app)

    async def stop_grpc(self) -> None:
        """Stop accepting RPCs; those in flight get ``server.shutdown_grace_s``."""
        if self.grpc is not None:
            from lastmile.appliance.server.grpc_service import stop_grpc

            server, self.grpc = self.grpc, None
            await stop_grpc(server, self.config, self.config.server["shutdown_grace_s"])

    def reload_config(self) -> None:
        """SIGHUP: read the config file again. An invalid file is reported and the running
        config stays; a valid one applies what can change live (per-model defaults for later
        loads, log level) and names the keys that only take effect after a restart."""
        try:
            new = load_config(self.config.file, system_mode=self.config.system_mode)
        except ConfigError as exc:
            self.events.record("config_rejected", f"SIGHUP: config not reloaded, keeping the running one: {exc}", level="error")
            return
        old = self.config
        needs_restart = [
            f"{section}.{key}"
            for section in ("server", "auth", "store")
            for key, value in getattr(new, section).items()
            if getattr(old, section).get(key) != value
        ]
        if new.memory != old.memory:
            needs_restart.append("memory (use `lastmile memory set` to change budgets live)")
        self.config = replace(old, defaults=new.defaults, sources={**old.sources, **{k: v for k, v in new.sources.items() if k.startswith("defaults.")}})
        self.config.server["log_level"] = new.server["log_level"]
        logging.getLogger().setLevel(new.server["log_level"].upper())
        self.manager.defaults = new.defaults
        message = "SIGHUP: config reloaded (defaults, log level)"
        if needs_restart:
            message += f"; these changed but take effect only after a restart: {', '.join(needs_restart)}"
        self.events.record("config_reloaded", message, level="warning" if needs_restart else "info")

    def save_state(self) -> None:
        """Persist what is loaded. A failure (disk full) keeps the old file and is an event,
        never a crash: serving goes on, and the write is retried (``STATE_RETRY_S``) until it
        succeeds, so a restart after the disk had room again still restores every model."""
        for name in self.manager.models:
            self.unrestored.pop(name, None)
        loaded = {name: m.overrides for name, m in self.manager.models.items() if m.state not in ("unloading", "draining")}
        models = {**self.unrestored, **loaded}
        try:
            write_state(self.config.store["state_file"], models)
        except OSError as exc:
            if self._state_failures == 0:
                self.events.record("state_write_failed", f"could not save state: {exc}; previous state kept, "
                                   f"retrying every {STATE_RETRY_S[0]:g}-{STATE_RETRY_S[-1]:g} s until it succeeds", level="error")
            self._state_failures += 1
            self._schedule_state_retry()
            return
        if self._state_failures:
            self.events.record("state_written", f"state saved after {self._state_failures} failed attempt(s)")
            self._state_failures = 0
        if self._state_retry is not None:
            self._state_retry.cancel()
            self._state_retry = None

    def _schedule_state_retry(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool calling save_state directly): the next change retries
            return
        if self._state_retry is not None:
            self._state_retry.cancel()
        delay = STATE_RETRY_S[min(self._state_failures - 1, len(STATE_RETRY_S) - 1)]
        self._state_retry = loop.call_later(delay, self._retry_state)

    def _retry_state(self) -> None:
        self._state_retry = None
        self.save_state()

    async def restore(self, notify_status: Callable[[str], None] | None = None) -> None:
        """Load what the state file lists. A model that fails is reported, not fatal."""
        path = self.config.store["state_file"]
        try:
            wanted, dropped = read_state_report(path)
        except StateError as exc:
            # Set aside, not overwritten by the next save: the operator can still read it.
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.rename(aside)
            self.events.record("state_unreadable", f"{exc}; moved to {aside}, starting with nothing loaded", level="error")
            return
        # a container names what it serves ($LASTMILE_LOAD, comma-separated; deploy/README.md):
        # loaded with the store's settings unless the state file already lists them
        for name in filter(None, (n.strip() for n in os.environ.get("LASTMILE_LOAD", "").split(","))):
            wanted.setdefault(name, {})
        for name, why in dropped.items():
            self.events.record("state_entry_invalid", f"state file {path}: model {name!r} not restored: {why}; "
                               f"the entry is dropped at the next save (load it again to keep it)", model=name, level="error")
        for i, (name, overrides) in enumerate(wanted.items(), 1):
            self.status = f"restoring {name} ({i}/{len(wanted)})"
            if notify_status:
                notify_status(self.status)
            try:
                await self.manager.load(name, overrides)
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others
                self.unrestored[name] = overrides
                self.events.record(
                    "restore_failed",
                    f"could not restore {name}: {exc}; kept in the state file and tried again at the next start "
                    f"(`lastmile unload {name}` forgets it)",
                    model=name,
                    level="error",
                )
        self.save_state()

    def read_store(self) -> None:
        """Every model folder's manifest, once, at start-up (in a thread): the signatures of
        bare artifacts are read (in forkserver children) before the daemon is ready, so its
        listings show them at once. A folder added later is read on its first listing, in
        the background. Errors are kept for the listings, not raised here."""
        self.store.entries()

    def build_demo_if_empty(self) -> list[str]:
        """The first start on an empty store builds the demo models, so there is something to serve."""
        if not self.config.store["build_demo"]:
            return []
        self.store.ensure()
        if self.store.names():
            return []
        from lastmile.runtime.forkserver import call_in_forkserver

        self.status = "building demo models"
        built = call_in_forkserver("lastmile.models.demo", "build_demo", self.config.store["models_dir"])
        self.events.record("demo_built", f"built demo models {built} in {self.config.store['models_dir']}")
        return built

    async def system_facts(self) -> dict[str, Any]:
        """Host facts, computed once in a forkserver child: the daemon stays free of torch."""
        if self._system is None:
            from lastmile.runtime.forkserver import call_in_forkserver

            self._system = await asyncio.get_running_loop().run_in_executor(None, call_in_forkserver, "lastmile.runtime.accelerators", "detect")
        memory = psutil.virtual_memory()  # the one fact that changes: read it fresh
        return {**self._system, "ram": {"total_bytes": memory.total, "available_bytes": memory.available}}

    def summary(self) -> dict[str, Any]:
        return {
            "name": "lastmile",
            "version": self.version,
            "pid": os.getpid(),
            # `lastmile stop` asks systemd's operator to use systemctl (a unit would restart us)
            "supervisor": "systemd" if os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET") else None,
            "ready": self.ready,
            "status": self.status,
            "uptime_s": round(time.time() - self.started_at, 3),
            "socket": str(self.config.socket_path),
            "tcp": f"{self.config.server['tcp_host']}:{self.config.server['tcp_port']}" if self.config.server["tcp_port"] else None,
            "grpc_tcp": f"{self.config.server['tcp_host']}:{self.config.server['grpc_port']}" if self.config.server.get("grpc_port") else None,
            "config_file": str(self.config.file) if self.config.file else None,
            "store": str(self.config.store["models_dir"]),
            "models_loaded": len(self.manager.models),
            "models": {n: m.state for n, m in self.manager.models.items()},
        }
