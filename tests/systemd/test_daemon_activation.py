"""The real daemon (``python -m lastmile.appliance.client.cli serve``) started the way systemd starts it.

``systemd-socket-activate`` binds the socket, passes it as fd 3 with LISTEN_FDS and
execs the daemon; NOTIFY_SOCKET and WATCHDOG_USEC point at a datagram socket in the
test. One daemon for the module: start-up imports torch and starts the runner
forkserver, which is the slow part. The store is empty (no demo build): what is
tested is the systemd and access-control plumbing, not models.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sdhelpers import NOBODY, SOCKET_GID, make_receiver, raw_request, request_as  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = [
    pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("lastmile.appliance.client.cli") is None, reason="lastmile.appliance.client.cli not there yet"),
]


class Activated:
    def __init__(self, proc: subprocess.Popen, sock: Path, notify, log: Path) -> None:
        self.proc, self.sock, self.notify, self.log = proc, sock, notify, log


@pytest.fixture(scope="module")
def activated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Activated]:
    base = Path(tempfile.mkdtemp(prefix="lm-d-", dir="/tmp"))
    os.chmod(base, 0o755)
    home = tmp_path_factory.mktemp("home")
    store = home / "store"
    store.mkdir()
    sock = base / "lastmile.sock"
    config = home / "lastmile.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\nshutdown_grace_s = 5\n'
        f'[store]\nmodels_dir = "{store}"\nstate_file = "{home / "state.json"}"\nbuild_demo = false\n'
    )
    notify = make_receiver("path", base)
    log = home / "daemon.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    cmd = [
        ACTIVATE, "-l", str(sock),
        "-E", f"NOTIFY_SOCKET={notify.address}", "-E", "WATCHDOG_USEC=4000000",
        "-E", f"PYTHONPATH={REPO}", "-E", f"HOME={home}", "-E", "DS_ACCELERATOR=cpu",
        sys.executable, "-m", "lastmile.appliance.client.cli", "serve", "--config", str(config),
    ]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        if os.geteuid() == 0:  # lay it out like lastmile.socket does: 0660 root:<group>
            os.chown(sock, 0, SOCKET_GID)
        os.chmod(sock, 0o660)
        # systemd-socket-activate (like a .socket unit) starts the program on the first
        # connection: knock once, as the first client would.
        knock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        knock.connect(str(sock))
        knock.close()
        try:
            notify.wait_for("READY", "1", timeout=120)
        except AssertionError:
            raise AssertionError(f"no READY=1; daemon log:\n{log.read_text(errors='replace')}") from None
        yield Activated(proc, sock, notify, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(base, ignore_errors=True)


def test_daemon_serves_the_passed_socket_and_reports_ready(activated: Activated) -> None:
    status, _ = raw_request(str(activated.sock), "GET", "/v2/health/ready")
    assert status == 200
    statuses = [m["STATUS"] for _, m in activated.notify.snapshot() if "STATUS" in m]
    assert statuses, "no STATUS= lines"
    activated.notify.wait_for("WATCHDOG", "1", timeout=10)
    assert "activated=True" in activated.log.read_text()  # it served fd 3, not a socket of its own


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/v2/repository/models/mlp/load"),
        ("POST", "/v2/repository/models/mlp/unload"),
        ("PATCH", "/lm/v1/models/mlp"),
    ],
)
def test_viewer_gets_403_from_the_real_daemon(activated: Activated, method: str, target: str) -> None:
    viewer = request_as(NOBODY, NOBODY, [SOCKET_GID], activated.sock, method, target)
    assert viewer["status"] == 403, viewer
    assert viewer["body"]["required_role"] == "operator"
    # root passes the role check and reaches the route (the store is empty: not found / bad request)
    status, body = raw_request(str(activated.sock), method, target)
    assert status not in (401, 403), body


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_viewer_may_read_and_index(activated: Activated) -> None:
    for method, target in [("GET", "/v2/health/ready"), ("GET", "/v2"), ("POST", "/v2/repository/index")]:
        result = request_as(NOBODY, NOBODY, [SOCKET_GID], activated.sock, method, target)
        assert result["status"] == 200, (method, target, result)


def test_zz_sigterm_sends_stopping(activated: Activated) -> None:
    """Last in the module: stops the daemon."""
    activated.proc.send_signal(signal.SIGTERM)
    assert activated.proc.wait(60) == 0, activated.log.read_text()
    activated.notify.wait_for("STOPPING", "1")
    assert {"READY", "STATUS", "WATCHDOG", "STOPPING"} <= activated.notify.keys_seen()
