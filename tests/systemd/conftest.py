"""Shared fixtures for the systemd/auth tests: a real sd_notify receiver socket."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"


@dataclass
class NotifyReceiver:
    """An AF_UNIX datagram socket that records every sd_notify message it gets."""

    address: str  # what goes into $NOTIFY_SOCKET (path or "@abstract")
    sock: socket.socket
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _stop: bool = False

    def start(self) -> None:
        self.sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def keys_seen(self) -> set[str]:
        return {k for _, m in self.snapshot() for k in m}

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, m in self.snapshot():
                if key in m and (value is None or m[key] == value):
                    return m
            time.sleep(0.01)
        raise AssertionError(f"no sd_notify {key}={value or '*'} within {timeout}s; got {self.snapshot()}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short, world-traversable temp dir (AF_UNIX paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="lm-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _receiver(kind: str, directory: Path) -> NotifyReceiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(directory / "notify.sock")
        sock.bind(address)
    else:
        name = f"lastmile-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    receiver = NotifyReceiver(address, sock)
    receiver.start()
    return receiver


@pytest.fixture(params=["path", "abstract"])
def notify_receiver(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[NotifyReceiver]:
    """A receiver bound to a filesystem path, then (second run) an abstract name."""
    receiver = _receiver(request.param, short_tmp)
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
def notify_path_receiver(short_tmp: Path) -> Iterator[NotifyReceiver]:
    receiver = _receiver("path", short_tmp)
    try:
        yield receiver
    finally:
        receiver.close()
