"""Socket activation through the real ``systemd-socket-activate``, with sd_notify captured."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lastmile.appliance.server.activation import listen_sockets

REPO = Path(__file__).resolve().parents[2]

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")


def _http_get(path: Path, target: str, timeout: float = 20.0) -> tuple[int, dict]:
    """One HTTP/1.1 GET over a Unix socket, without any client library."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: lastmile\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body) if body else {}


@needs_activate
def test_activated_app_serves_and_notifies(short_tmp: Path, notify_path_receiver) -> None:
    sock_path = short_tmp / "lastmile.sock"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    cmd = [
        ACTIVATE, "-l", str(sock_path), "--fdname=control",
        "-E", f"NOTIFY_SOCKET={notify_path_receiver.address}",
        "-E", "WATCHDOG_USEC=200000",
        "-E", f"PYTHONPATH={REPO}",
        sys.executable, str(Path(__file__).with_name("activated_app.py")),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # systemd-socket-activate binds before starting the program: the socket
        # exists at once and a connection made now queues until the app serves.
        deadline = time.monotonic() + 10
        while not sock_path.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.01)
        status, body = _http_get(sock_path, "/probe")
        assert status == 200, body
        assert body["fds"] == 1 and body["names"] == ["control"]
        assert body["env_after"] == {}, "LISTEN_* must be removed from our environment"
        assert body["child_env"] == {}, "a child inherited LISTEN_*"
        assert body["child_has_socket"] is False, "a child inherited the listening socket (no CLOEXEC)"
        assert body["caller"] == "operator" and body["uid"] == os.getuid()

        ready = notify_path_receiver.wait_for("READY", "1")
        assert "serving on 1 activated socket" in ready["STATUS"]
        notify_path_receiver.wait_for("WATCHDOG", "1")
        assert any("got 1 socket" in m.get("STATUS", "") for _, m in notify_path_receiver.snapshot())

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        notify_path_receiver.wait_for("STOPPING", "1")
        assert {"READY", "STATUS", "WATCHDOG", "STOPPING"} <= notify_path_receiver.keys_seen()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (fd 3 there is ours to play with)."""
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=30)


def test_no_activation_gives_no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert listen_sockets() == []


def test_sockets_meant_for_another_process_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_sockets() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


SETUP_FD3 = """
    import os, socket, sys
    from lastmile.appliance.server.activation import listen_sockets, ActivationError
    s = socket.socket(socket.AF_UNIX, {kind})
    {prepare}
    os.dup2(s.fileno(), 3)
    os.environ['LISTEN_PID'] = str(os.getpid())
    os.environ['LISTEN_FDS'] = {fds!r}
    try:
        socks = listen_sockets()
    except ActivationError as exc:
        print('ERROR', exc)
    else:
        print('OK', [x.fileno() for x in socks], os.get_inheritable(3))
"""


@pytest.mark.parametrize(
    ("kind", "prepare", "fds", "expected"),
    [
        ("socket.SOCK_STREAM", "s.bind('\\0lm-act-' + str(os.getpid())); s.listen()", "1", "OK [3] False"),
        ("socket.SOCK_STREAM", "pass", "1", "ERROR passed fd 3 is not listening: the .socket unit needs Accept=no"),
        ("socket.SOCK_DGRAM", "pass", "1", "ERROR passed fd 3 is not a stream socket"),
        ("socket.SOCK_STREAM", "pass", "two", "ERROR LISTEN_FDS='two' is not a number"),
        ("socket.SOCK_STREAM", "s.bind('\\0lm-act2-' + str(os.getpid())); s.listen()", "2",
         "ERROR passed fd 4 (LISTEN_FDS=2) is not a usable socket"),
    ],
)
def test_listen_sockets_checks_what_it_is_given(kind: str, prepare: str, fds: str, expected: str) -> None:
    result = _run_child(SETUP_FD3.format(kind=kind, prepare=prepare, fds=fds))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(expected), result.stdout


def test_fdnames_count_must_match() -> None:
    code = SETUP_FD3.replace("os.environ['LISTEN_FDS']", "os.environ['LISTEN_FDNAMES'] = 'a:b'\n    os.environ['LISTEN_FDS']")
    result = _run_child(code.format(kind="socket.SOCK_STREAM", prepare="s.bind('\\0lm-n'); s.listen()", fds="1"))
    assert "ERROR LISTEN_FDNAMES has 2 names but LISTEN_FDS=1" in result.stdout, result.stdout + result.stderr
