"""Helpers shared by the systemd/auth tests (imported by file location, not as a package).

A real sd_notify receiver socket, a dependency-free HTTP/1.1 client for Unix sockets,
and a client that runs as another uid/gid in a forked child.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
SOCKET_GID = 4242  # the socket's group in tests (stands in for "lastmile")
ADMIN_GID = 4243  # an operator group given by number


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


def make_receiver(kind: str, directory: Path) -> NotifyReceiver:
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


def raw_request(path: str, method: str, target: str) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        body = b"{}" if method != "GET" else b""
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: lastmile\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), (json.loads(payload) if payload else {})


def request_as(uid: int, gid: int, groups: list[int], path: Path, method: str, target: str) -> dict:
    """Fork, drop to uid/gid/groups, make one request; returns status/body or the errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest, no asyncio; syscalls and exit
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                status, body = raw_request(str(path), method, target)
                out = {"status": status, "body": body, "pid": os.getpid()}
            except OSError as exc:
                out = {"errno": exc.errno}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "child wrote nothing"}')
