"""Shared fixtures: a real daemon in a subprocess on a temp socket, with a temp store that holds
the demo models (built once per test session)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import pytest

if TYPE_CHECKING:
    from lastmile.appliance.client.api import LastmileClient
    from lastmile.runtime.shm import BufferPool

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DaemonProc:
    proc: subprocess.Popen
    socket: Path
    config: Path
    home: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


def write_config(home: Path, store: Path, extra: str = "", server_extra: str = "", state_file: Path | None = None) -> Path:
    """``extra`` goes after the [store] table (whole tables); ``server_extra`` inside [server]."""
    config = home / "lastmile.toml"
    config.write_text(
        f"""
[server]
socket = "{home / 'run' / 'lastmile.sock'}"
shutdown_grace_s = 5
{server_extra}
[store]
models_dir = "{store}"
state_file = "{state_file or home / 'state.json'}"
{extra}
"""
    )
    return config


def start_daemon(
    home: Path,
    store: Path,
    extra_config: str = "",
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    server_extra: str = "",
    state_file: Path | None = None,
) -> DaemonProc:
    home.mkdir(parents=True, exist_ok=True)
    config = write_config(home, store, extra_config, server_extra, state_file)
    log = home / "daemon.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LASTMILE_", "NOTIFY_SOCKET", "LISTEN_"))}
    full_env.update({"PYTHONPATH": str(ROOT), "HOME": str(home)}, **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastmile.appliance.client.cli", "serve", "--config", str(config)],
        cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
    )
    daemon = DaemonProc(proc, home / "run" / "lastmile.sock", config, home, log)
    if wait_ready:
        deadline = time.monotonic() + 120
        while not socket_answers(daemon.socket):
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{daemon.log_text()}")
            if time.monotonic() > deadline:
                daemon.stop(signal.SIGKILL)
                raise RuntimeError(f"daemon not ready after 120 s:\n{daemon.log_text()}")
            time.sleep(0.1)
    return daemon


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tcp_daemon(home: Path, store: Path, token: str, server_extra: str = "", **kwargs) -> tuple[DaemonProc, int]:
    """A daemon that also listens on TCP (127.0.0.1 unless ``server_extra`` sets ``tcp_host``)
    with ``token`` as its bearer token (written 0600, as the daemon insists); its TCP port."""
    home.mkdir(parents=True, exist_ok=True)
    token_file = home / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    port = free_port()
    daemon = start_daemon(home, store, server_extra=f'tcp_port = {port}\ntoken_file = "{token_file}"\n{server_extra}', **kwargs)
    return daemon, port


@contextlib.asynccontextmanager
async def client_then_stop(daemon: DaemonProc) -> AsyncIterator["LastmileClient"]:
    """A client on ``daemon``'s socket for the block; then the daemon is stopped, also when the
    block fails, so a failing test leaves no daemon (and no runners) behind."""
    from lastmile.appliance.client.api import LastmileClient

    try:
        async with LastmileClient(daemon.socket) as client:
            yield client
    finally:
        daemon.stop()


async def get_error(socket: Path, path: str) -> tuple[int, str]:
    """GET ``path`` over the daemon's unix socket with a bare aiohttp session (no client
    library in between): the status and the ``error`` text of the body, which must be JSON
    (``resp.json()`` refuses any other content type)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as session:
        async with session.get("http://localhost" + path) as resp:
            return resp.status, (await resp.json())["error"]


@pytest.fixture(scope="session")
def forkserver() -> float:
    """The preloaded forkserver (torch, deepspeed, onnxruntime imported there), started once."""
    from lastmile.runtime.forkserver import warm_up

    return warm_up()


@pytest.fixture
def shm_pool(request: pytest.FixtureRequest) -> Iterator["BufferPool"]:
    """A shared-memory buffer pool per test; afterwards nothing of it may be left in /dev/shm."""
    from lastmile.runtime.shm import BufferPool, count_segments

    pool = BufferPool(f"lastmile-{os.getpid()}-{request.node.name[:40]}-")
    yield pool
    pool.close()
    assert count_segments(pool.prefix) == 0


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models, built once; tests that change the store copy it first."""
    from lastmile.models.demo import build_demo

    store = tmp_path_factory.mktemp("store")
    build_demo(store)
    return store


@pytest.fixture
def store_copy(demo_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    return store


@pytest.fixture(scope="module")
def daemon(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon per test module, on the shared demo store (tests must not modify the store)."""
    proc = start_daemon(tmp_path_factory.mktemp("daemon"), demo_store)
    yield proc
    proc.stop()
