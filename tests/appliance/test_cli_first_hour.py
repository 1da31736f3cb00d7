"""The CLI of the first hour (issue 21, items 5 and 6): the README's `lastmile bench` lines
parse, a mistyped flag or command gets a "did you mean", a typo in the user's config file does
not stop `status` against a healthy daemon, `chat` with a wrong name fails at once, one set of
sampling defaults shown in --help, `load` of a loaded model says so, and nothing prints Python
reprs or internal names where the operator reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, DaemonProc


def lastmile(*args: str, home: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120,
             input_text: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LASTMILE_", "XDG_"))}
    base.update({"PYTHONPATH": str(ROOT)}, **(env or {}))
    if home:
        base["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "lastmile.appliance.client.cli", *args], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=timeout, input=input_text if input_text is not None else "")


def test_bench_commands_of_the_readme_parse(demo_store: Path) -> None:
    helped = lastmile("bench", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage: lastmile bench" in helped.stdout and "--store" in helped.stdout and "--models" in helped.stdout
    run = lastmile("bench", "--store", str(demo_store), "--models", "no-such-model", timeout=120)
    assert "unrecognized arguments" not in run.stderr, run.stderr
    assert run.returncode != 0 and "no-such-model" in run.stderr and "not in the store" in run.stderr, run.stderr


def test_a_typo_gets_did_you_mean(tmp_path: Path) -> None:
    flag = lastmile("--socket", str(tmp_path / "none.sock"), "load", "demo-mlp", "--memory-limt", "20")
    assert flag.returncode == 2
    assert "did you mean --memory-limit?" in flag.stderr and "usage: lastmile load" in flag.stderr, flag.stderr
    command = lastmile("statsu")
    assert command.returncode == 2 and "did you mean status?" in command.stderr, command.stderr


def test_a_config_typo_does_not_stop_status(daemon: DaemonProc, tmp_path: Path) -> None:
    config = tmp_path / ".config" / "lastmile" / "lastmile.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[server]\nsocket = "{daemon.socket}"\n[memory]\nhost_limt_mb = 100\n')
    status = lastmile("status", home=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "ready" in status.stdout and "warning" in status.stderr and "host_limt_mb" in status.stderr, status.stderr
    config.write_text("[memory]\nhost_limt_mb = 100\n")  # no socket in the file: $LASTMILE_SOCKET wins
    status = lastmile("status", "--json", home=tmp_path, env={"LASTMILE_SOCKET": str(daemon.socket)})
    assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True, status.stderr
    # commands that need the config itself still refuse it
    assert lastmile("config", "show", home=tmp_path).returncode != 0


def test_chat_with_a_model_not_in_the_store_fails_at_once(daemon: DaemonProc) -> None:
    started = time.monotonic()
    result = lastmile("--socket", str(daemon.socket), "chat", "no-such-chat", input_text="hello\n")
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "not in the store" in result.stderr and "no-such-chat>" not in result.stdout, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    tensor = lastmile("--socket", str(daemon.socket), "chat", "demo-mlp", input_text="")
    assert tensor.returncode == 1 and "not loaded" in tensor.stderr, tensor.stderr


def test_one_set_of_sampling_defaults_shown_in_help() -> None:
    from lastmile.appliance.client.chat import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingOptions

    assert (DEFAULT_TEMPERATURE, DEFAULT_TOP_P) == (0.7, 0.9)
    body = SamplingOptions().body()
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    helped = lastmile("chat", "--help").stdout
    assert "default 0.7" in helped and "default 0.9" in helped and "default 1" not in helped, helped


def test_load_twice_says_already_loaded_and_refusals_print_commands(daemon: DaemonProc) -> None:
    sock = ["--socket", str(daemon.socket)]
    first = lastmile(*sock, "load", "demo-mlp")
    assert first.returncode == 0 and first.stdout.startswith("loaded demo-mlp"), first.stderr
    again = lastmile(*sock, "load", "demo-mlp")
    assert again.returncode == 0 and "already loaded" in again.stdout and " in 0.0" not in again.stdout, again.stdout
    dry = lastmile(*sock, "load", "demo-lm-ds", "--memory-limit", "20", "--dry-run")
    assert "limit_machinery" not in dry.stdout and "{" not in dry.stdout, dry.stdout
    assert "lastmile load demo-lm-ds --memory-limit " in dry.stdout, dry.stdout
    refused = lastmile(*sock, "load", "demo-lm-ds", "--memory-limit", "20")
    assert refused.returncode == 5 and "lastmile load demo-lm-ds --memory-limit " in refused.stderr, refused.stderr
    assert "{'" not in refused.stderr, refused.stderr
    assert lastmile(*sock, "unload", "demo-mlp").returncode == 0


def test_tune_table_prints_settings_as_typed() -> None:
    from lastmile.appliance.client.autotune import Trial, TuneResult, format_table

    settings = {"max_batch_size": 8, "max_delay_ms": 1.0, "graph_fusion": "all", "threads": 0}
    trial = Trial(settings=settings, rows_per_s=100.0, throughput_rps=100.0, p50_ms=1.0, p99_ms=2.0, avg_batch_size=4.0, meets_slo=True)
    text = format_table(TuneResult(model="demo-mlp", latency_slo_ms=None, original={}, trials=[trial], best=trial))
    best = next(line for line in text.splitlines() if line.startswith("best:"))
    assert "{" not in best and "max_batch_size 8" in best
    assert "lastmile load demo-mlp --max-batch-size 8 --max-delay-ms 1 --graph-fusion all --threads 0" in best, best
