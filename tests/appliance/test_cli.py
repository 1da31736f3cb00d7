"""The ``lastmile`` command as a user runs it: real subprocesses, output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, DaemonProc


def lastmile(*args: str, home: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    base.update({"PYTHONPATH": str(ROOT)}, **(env or {}))
    if home:
        base["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "lastmile.appliance.client.cli", *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=timeout)


def test_daemon_not_running_is_one_line_exit_3(tmp_path: Path) -> None:
    result = lastmile("--socket", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0
    assert "not running" in result.stderr and "Traceback" not in result.stderr


def test_permission_denied_is_exit_4(daemon: DaemonProc, tmp_path: Path) -> None:
    """A user outside the socket's group gets one line and exit 4. Runs the CLI as ``nobody``
    with the system's python (the venv's interpreter lives under /root here) on the venv's
    packages, so the kernel's permission check on the 0750 socket directory is the real one."""
    system_python = Path("/usr/bin/python3")
    if os.getuid() != 0 or not system_python.exists():
        pytest.skip("needs root (to switch to nobody) and /usr/bin/python3")
    probe = subprocess.run([str(system_python), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    if probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip("/usr/bin/python3 is another Python version than the venv's")
    site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    # site.addsitedir, not PYTHONPATH: the editable install's finder is loaded by a .pth file
    run_cli = ("import runpy, site, sys; [site.addsitedir(p) for p in sys.argv.pop(1).split(':')]; "
               "runpy.run_module('lastmile.appliance.client.cli', run_name='__main__', alter_sys=True)")
    result = subprocess.run(
        [str(system_python), "-c", run_cli, os.pathsep.join(site), "--socket", str(daemon.socket), "status"],
        cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        capture_output=True, text=True, timeout=60, user="nobody", group="nogroup", extra_groups=[],
    )
    assert result.returncode == 4, result.stderr
    assert "permission denied" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[defaults]\ndtype = 'int4'\n")
    result = lastmile("--config", str(config), "config", "show")
    assert result.returncode == 1
    assert result.stderr.strip() == f"lastmile: {config}: defaults.dtype: got 'int4'; allowed: fp32, fp16, bf16"


def test_config_show_lists_sources(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[defaults]\nmax_batch_size = 12\n")
    result = lastmile("--config", str(config), "config", "show", home=tmp_path)
    assert result.returncode == 0
    assert f"max_batch_size = 12  # file {config}" in result.stdout
    assert "tcp_port = 0  # default (user mode)" in result.stdout
    data = json.loads(lastmile("--config", str(config), "config", "show", "--json", home=tmp_path).stdout)
    assert data["values"]["defaults"]["max_batch_size"] == 12


def test_usage_error_is_exit_2() -> None:
    result = lastmile("load")
    assert result.returncode == 2 and "usage:" in result.stderr


def test_status_system_models_load_infer_unload(daemon: DaemonProc, tmp_path: Path) -> None:
    sock = ["--socket", str(daemon.socket)]
    status = json.loads(lastmile(*sock, "status", "--json").stdout)
    assert status["ready"] is True and status["socket"] == str(daemon.socket)
    assert "ready" in lastmile(*sock, "status").stdout
    system = lastmile(*sock, "system")
    assert system.returncode == 0 and "onnxruntime providers: " in system.stdout
    load = lastmile(*sock, "load", "demo-mlp", "--max-batch-size", "8", "--graph-fusion", "all")
    assert load.returncode == 0 and "loaded demo-mlp (onnxruntime on cpu" in load.stdout, load.stderr
    models = lastmile(*sock, "models")
    assert "demo-mlp " in models.stdout and "ready" in models.stdout
    x = np.full((2, 64), 0.5, np.float32)
    np.save(tmp_path / "x.npy", x)
    result = lastmile(*sock, "infer", "demo-mlp", "--input", f"input={tmp_path / 'x.npy'}", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["outputs"]["logits"]["shape"] == [2, 10]
    text = lastmile(*sock, "infer", "demo-mlp", "--random")
    assert "logits: shape [1, 10]" in text.stdout and "latency:" in text.stdout
    bad = lastmile(*sock, "load", "demo-mlp", "--dtype", "int8")
    assert bad.returncode == 1 and "dtype" in bad.stderr and "Traceback" not in bad.stderr
    missing = lastmile(*sock, "infer", "demo-mlp")
    assert missing.returncode == 1 and "--random" in missing.stderr
    assert lastmile(*sock, "unload", "demo-mlp").returncode == 0
    gone = lastmile(*sock, "unload", "demo-mlp")
    assert gone.returncode == 1 and "not loaded" in gone.stderr


def test_demo_command_from_nothing(tmp_path: Path) -> None:
    """The README's main command on an empty home: starts the daemon, builds and loads the demo
    models on both backends, serves requests; both backends of a model give the same answer."""
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}
    result = lastmile("demo", "--no-tui", home=tmp_path, env=env, timeout=300)
    status = lastmile("status", "--json", home=tmp_path, env=env)
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        lines = result.stdout.splitlines()
        for name, backend in (("demo-mlp", "onnxruntime"), ("demo-mlp-ds", "deepspeed"), ("demo-lm", "onnxruntime"), ("demo-lm-ds", "deepspeed")):
            assert any(line.startswith(f"loaded {name} ") and backend in line for line in lines), result.stdout
        answers = {line.split()[0]: line.split("argmax")[1].split("]")[0] for line in lines if "argmax" in line}
        assert answers["demo-mlp"] == answers["demo-mlp-ds"] and answers["demo-lm"] == answers["demo-lm-ds"]
        assert json.loads(status.stdout)["models_loaded"] == 4
    finally:
        if status.returncode == 0:
            os.kill(json.loads(status.stdout)["pid"], 15)
