"""The daemon started the way the container starts it: the ServingRuntime's command and args
(sh writes the Secret's token to a 0600 file, then ``exec lastmile serve``), its environment
(with paths moved to a temp dir and free ports), no config file, no systemd. Then the kubelet's
probes, the model named by LASTMILE_LOAD, /metrics and gRPC over TCP with the token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

yaml = pytest.importorskip("yaml")
grpcclient = pytest.importorskip("tritonclient.grpc")

TOKEN = "container-token-0123456789abcdef"


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def test_starts_like_the_container(demo_store: Path, tmp_path: Path) -> None:
    runtime = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    http_port, grpc_port = free_port(), free_port()
    moved = {"/mnt/models": str(demo_store), "/var/lib/lastmile": str(tmp_path / "state"), "/run/lastmile": str(tmp_path / "run")}
    (tmp_path / "state").mkdir()
    (tmp_path / "run").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LASTMILE_", "NOTIFY_SOCKET", "LISTEN_", "INVOCATION_ID"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_RUNTIME_DIR=str(tmp_path / "xdg"))
    for item in container["env"]:
        if "valueFrom" in item:
            assert item["name"] == "LASTMILE_TOKEN"
            env["LASTMILE_TOKEN"] = TOKEN  # the Secret's value
            continue
        value = item["value"].replace("{{.Name}}", "demo-mlp")
        for old, new in moved.items():
            value = value.replace(old, new)
        env[item["name"]] = value
    env["LASTMILE_HTTP_PORT"], env["LASTMILE_GRPC_PORT"] = str(http_port), str(grpc_port)
    env["LASTMILE_SOCKET"] = str(tmp_path / "run" / "lastmile.sock")  # the image's ENV (Containerfile)
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([*container["command"], *container["args"]], env=env, cwd=tmp_path, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while _get(f"{base}/v2/health/ready")[0] != 200:  # the readiness probe, no token
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.2)
        assert _get(f"{base}/v2/health/live")[0] == 200
        token_file = Path(env["LASTMILE_TOKEN_FILE"])
        assert token_file.stat().st_mode & 0o077 == 0
        assert _get(f"{base}/v2/models/demo-mlp/ready", TOKEN)[0] == 200  # LASTMILE_LOAD loaded it
        assert _get(f"{base}/v2/models/demo-mlp")[0] == 401  # everything but health needs the token
        status, metrics = _get(f"{base}/metrics", TOKEN)
        assert status == 200 and b"lastmile_up 1.0" in metrics and b'lastmile_model_ready{model="demo-mlp"} 1.0' in metrics
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        assert client.is_server_ready()
        assert client.is_model_ready("demo-mlp", headers={"authorization": f"Bearer {TOKEN}"})
        status, body = _get(f"{base}/lm/v1/config", TOKEN)
        assert status == 200 and b"environment LASTMILE_STORE" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
