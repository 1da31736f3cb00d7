"""The ``lastmile`` command as a user runs it: real subprocesses, output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import psutil
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
    # The output is valid TOML (unset keys commented out) and reads back as the same config
    parsed = tomllib.loads(result.stdout)
    assert parsed["defaults"]["max_batch_size"] == 12 and "token_file" not in parsed["server"]
    assert "# token_file =  # unset" in result.stdout and "(unset)" not in result.stdout
    again = tmp_path / "again.toml"
    again.write_text(result.stdout)
    assert lastmile("--config", str(again), "config", "show", home=tmp_path).returncode == 0
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
    assert load.returncode == 0 and "loaded demo-mlp (onnxruntime fp32 on cpu" in load.stdout, load.stderr
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
    assert bad.returncode == 2 and "--dtype" in bad.stderr and "'fp32', 'fp16', 'bf16'" in bad.stderr and "Traceback" not in bad.stderr
    missing = lastmile(*sock, "infer", "demo-mlp")
    assert missing.returncode == 1 and "--random" in missing.stderr
    assert lastmile(*sock, "unload", "demo-mlp").returncode == 0
    gone = lastmile(*sock, "unload", "demo-mlp")
    assert gone.returncode == 1 and "not loaded" in gone.stderr


def test_demo_command_from_nothing(tmp_path: Path) -> None:
    """The README's main command on an empty home: starts the daemon, builds and loads the demo
    models on both backends, serves requests; both backends of a model give the same answer."""
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}
    result = lastmile("demo", "--no-tui", "--no-chat", home=tmp_path, env=env, timeout=300)
    status = lastmile("status", "--json", home=tmp_path, env=env)
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        lines = result.stdout.splitlines()
        for name, backend in (("demo-mlp", "onnxruntime"), ("demo-mlp-ds", "deepspeed"), ("demo-lm", "onnxruntime"), ("demo-lm-ds", "deepspeed")):
            assert any(line.startswith(f"loaded {name} ") and backend in line for line in lines), result.stdout
        answers = {line.split()[0]: line.split("argmax")[1].split("]")[0] for line in lines if "argmax" in line}
        assert answers["demo-mlp"] == answers["demo-mlp-ds"] and answers["demo-lm"] == answers["demo-lm-ds"]
        assert any(line.startswith("demo-encoder ") and "embeddings: shape [3, 32]" in line for line in lines), result.stdout
        assert json.loads(status.stdout)["models_loaded"] == 5  # 4 tensor demos + demo-encoder (text)
        # A second `lastmile demo` leaves the settings an operator changed
        pid = json.loads(status.stdout)["pid"]
        assert lastmile("tune", "demo-mlp", "--batch-sizes", "5", "--delays-ms", "0", "--clients", "2", "--duration-s", "0.3",
                        "--apply", home=tmp_path, env=env).returncode == 0
        again = lastmile("demo", "--no-tui", "--no-chat", home=tmp_path, env=env, timeout=300)
        assert again.returncode == 0, again.stderr
        assert any(line.startswith("kept   demo-mlp ") and "settings are left" in line for line in again.stdout.splitlines()), again.stdout
        model = json.loads(lastmile("status", "--json", home=tmp_path, env=env).stdout)
        assert model["pid"] == pid
        listing = json.loads(lastmile("models", "--json", home=tmp_path, env=env).stdout)
        assert next(m for m in listing["loaded"] if m["name"] == "demo-mlp")["settings"]["max_batch_size"] == 5
        # `lastmile stop` stops it gracefully, waits, and says what it did
        stopped = lastmile("stop", home=tmp_path, env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped the daemon (pid {pid}) in " in stopped.stdout and "demo-mlp" in stopped.stdout
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        after = lastmile("status", home=tmp_path, env=env)
        assert after.returncode == 3
        assert "draining in-flight requests" in (tmp_path / "state" / "lastmile" / "daemon.log").read_text()  # its own stop path
    finally:
        if status.returncode == 0 and psutil.pid_exists(json.loads(status.stdout)["pid"]):
            os.kill(json.loads(status.stdout)["pid"], 15)


# --- the operator's experience -------------------------------------------------------------


def test_help_lists_allowed_values() -> None:
    """`load --help` and `tune --help` name the allowed values; a wrong one is a usage error naming them."""
    load = " ".join(lastmile("load", "--help").stdout.split())  # argparse wraps at the terminal width
    for values in ("auto, deepspeed, onnxruntime", "fp32, fp16, bf16", "off, basic, extended, all", "none, cpu", "cuda:N", "MiB"):
        assert values in load, values
    tune = " ".join(lastmile("tune", "--help").stdout.split())
    assert "off, basic, extended, all" in tune and "1-4096" in tune
    bad = lastmile("tune", "x", "--fusions", "basic,max")
    assert bad.returncode == 2 and "graph_fusion 'max'; allowed: off, basic, extended, all" in bad.stderr


def test_failures_error_rate_and_last_error_in_status_and_models(daemon: DaemonProc, tmp_path: Path) -> None:
    """Failing requests show as FAILURES and an error rate, with the last error, in
    `status` and `models` (token ids past demo-lm's vocabulary make ONNX Runtime fail)."""
    sock = ["--socket", str(daemon.socket)]
    assert lastmile(*sock, "load", "demo-lm").returncode == 0
    try:
        bad = tmp_path / "ids.npy"
        np.save(bad, np.full((1, 8), 100_000, np.int64))
        for _ in range(3):
            failed = lastmile(*sock, "infer", "demo-lm", "--input", f"input_ids={bad}")
            assert failed.returncode == 5 and "out of data bounds" in failed.stderr
        assert lastmile(*sock, "infer", "demo-lm", "--random").returncode == 0
        status = lastmile(*sock, "status").stdout
        row = next(line.split() for line in status.splitlines() if line.startswith("demo-lm "))
        header = next(line.split() for line in status.splitlines() if line.startswith("MODEL"))
        assert dict(zip(header, row))["REQUESTS"] == "4" and dict(zip(header, row))["FAILURES"] == "3"
        assert dict(zip(header, row))["ERR_RATE"] == "75.0%"
        last = next(line for line in status.splitlines() if line.startswith("  demo-lm at "))
        assert "out of data bounds" in last and "demo-lm: model" not in last  # the name is not repeated
        models = lastmile(*sock, "models").stdout
        assert "75.0%" in next(line for line in models.splitlines() if line.startswith("demo-lm ")) and "out of data bounds" in models
        as_json = json.loads(lastmile(*sock, "status", "--json").stdout)
        assert as_json["supervisor"] is None
    finally:
        lastmile(*sock, "unload", "demo-lm")


def test_infer_converts_dtypes_that_lose_nothing_and_explains_the_rest(daemon: DaemonProc, tmp_path: Path) -> None:
    """A float64 .npy (np.random.rand) for an FP32 input and int32 ids for INT64 are
    converted (a note says so); floats for integer ids are refused naming both dtypes and the fix."""
    sock = ["--socket", str(daemon.socket)]
    assert lastmile(*sock, "load", "demo-mlp").returncode == 0
    assert lastmile(*sock, "load", "demo-lm").returncode == 0
    try:
        x = np.random.default_rng(0).random((5, 64))  # float64
        np.save(tmp_path / "x.npy", x)
        ok = lastmile(*sock, "infer", "demo-mlp", "--input", f"input={tmp_path / 'x.npy'}", "--json")
        assert ok.returncode == 0, ok.stderr
        assert "float64" in ok.stderr and "FP32" in ok.stderr and "converted" in ok.stderr
        assert json.loads(ok.stdout)["outputs"]["logits"]["shape"] == [5, 10]
        np.save(tmp_path / "x32.npy", x.astype(np.float32))
        same = lastmile(*sock, "infer", "demo-mlp", "--input", f"input={tmp_path / 'x32.npy'}", "--json")
        np.testing.assert_allclose(json.loads(same.stdout)["outputs"]["logits"]["data"], json.loads(ok.stdout)["outputs"]["logits"]["data"])
        np.save(tmp_path / "ids32.npy", np.arange(16, dtype=np.int32).reshape(2, 8))
        ids = lastmile(*sock, "infer", "demo-lm", "--input", f"input_ids={tmp_path / 'ids32.npy'}")
        assert ids.returncode == 0 and "int32" in ids.stderr and "INT64" in ids.stderr, ids.stderr
        np.save(tmp_path / "idsf.npy", np.random.default_rng(0).random((2, 8)))
        refused = lastmile(*sock, "infer", "demo-lm", "--input", f"input_ids={tmp_path / 'idsf.npy'}")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert "float64" in refused.stderr and "INT64" in refused.stderr and "x.astype(np.int64)" in refused.stderr
        text = lastmile(*sock, "infer", "demo-mlp", "--random").stdout
        assert "rode in batch #" in text and "row(s) in that batch" in text
    finally:
        lastmile(*sock, "unload", "demo-mlp")
        lastmile(*sock, "unload", "demo-lm")


def test_events_json_level_and_model_filters(daemon: DaemonProc) -> None:
    """`events --json` is JSON Lines; `--level` is a minimum; `--model` keeps one model's."""
    sock = ["--socket", str(daemon.socket)]
    assert lastmile(*sock, "load", "demo-mlp").returncode == 0
    refused = lastmile(*sock, "load", "demo-lm-ds", "--memory-limit", "16")  # a warning event (load_refused)
    assert refused.returncode == 5, refused.stderr
    lastmile(*sock, "unload", "demo-mlp")
    every = [json.loads(line) for line in lastmile(*sock, "events", "--json").stdout.splitlines()]
    assert every and all({"seq", "time", "level", "kind", "message"} <= set(e) for e in every)
    mine = [json.loads(line) for line in lastmile(*sock, "events", "--json", "--model", "demo-mlp").stdout.splitlines()]
    assert mine and {e["model"] for e in mine} == {"demo-mlp"}
    assert {e["kind"] for e in mine} >= {"loaded", "unloaded"}
    warnings = [json.loads(line) for line in lastmile(*sock, "events", "--json", "--level", "warning").stdout.splitlines()]
    assert all(e["level"] in ("warning", "error") for e in warnings)
    assert any(e["kind"] == "load_refused" and e["model"] == "demo-lm-ds" for e in warnings)
    assert len(warnings) < len(every)
    text = lastmile(*sock, "events", "--model", "demo-mlp").stdout
    assert "demo-mlp" in text and " loaded " in text


def test_stop_refuses_under_systemd(store_copy: Path, tmp_path: Path) -> None:
    """A daemon started by systemd (INVOCATION_ID set, as systemd does for every unit)
    is not signalled: the operator is told to use systemctl, and the daemon keeps serving."""
    from tests.conftest import start_daemon

    d = start_daemon(tmp_path / "home", store_copy, env={"INVOCATION_ID": "0123456789abcdef0123456789abcdef"})
    try:
        result = lastmile("--socket", str(d.socket), "stop")
        assert result.returncode == 1 and "systemctl stop lastmile" in result.stderr
        assert d.proc.poll() is None
        assert "(under systemd)" in lastmile("--socket", str(d.socket), "status").stdout
    finally:
        d.stop()
