"""The daemon as a real process on a temp socket: start, permissions, refusal of a second
daemon, stale sockets, SIGTERM drain, state restore."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lastmile.appliance.client.api import DaemonNotRunning, LastmileClient
from tests.conftest import ROOT, DaemonProc, socket_answers, start_daemon


def test_socket_and_directory_modes(daemon: DaemonProc) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o750
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)


def test_second_daemon_on_live_socket_is_refused(daemon: DaemonProc, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    result = subprocess.run(
        [sys.executable, "-m", "lastmile.appliance.client.cli", "serve", "--config", str(daemon.config)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "another daemon is already serving" in result.stderr
    assert "Traceback" not in result.stderr
    assert socket_answers(daemon.socket), "the first daemon must keep serving"


def test_stale_socket_is_replaced_and_non_socket_refused(demo_store: Path, tmp_path: Path) -> None:
    home = tmp_path / "d"
    sock_path = home / "run" / "lastmile.sock"
    sock_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # a socket file nobody listens on: what a killed daemon leaves
    d = start_daemon(home, demo_store)
    try:
        assert socket_answers(d.socket)
    finally:
        assert d.stop() == 0
    assert not sock_path.exists(), "a clean stop removes the socket"
    sock_path.write_text("not a socket")
    d = start_daemon(home, demo_store, wait_ready=False)
    assert d.proc.wait(60) == 1
    assert "is not a socket; refusing to remove it" in d.log_text()
    assert sock_path.read_text() == "not a socket"


async def test_sigterm_drains_in_flight_requests_and_exits_zero(demo_store: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", demo_store)
    try:
        async with LastmileClient(d.socket) as client:
            await client.load("demo-mlp", {"max_batch_size": 64})
            x = np.ones((1, 64), np.float32)
            # The runner is stopped: SIGTERM arrives while the requests are in flight.
            runner = (await client.model("demo-mlp"))["runners"][0]["pid"]
            os.kill(runner, signal.SIGSTOP)
            try:
                pending = [asyncio.create_task(client.infer("demo-mlp", {"input": x}, {"input": "FP32"})) for _ in range(4)]
                await asyncio.sleep(0.1)
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                assert not any(t.done() for t in pending)
            finally:
                os.kill(runner, signal.SIGCONT)
            results = await asyncio.gather(*pending)
        assert all(out["logits"].shape == (1, 10) for out, _ in results)
        assert await asyncio.get_running_loop().run_in_executor(None, d.proc.wait, 30) == 0
        assert not d.socket.exists()
        async with LastmileClient(d.socket) as client:
            with pytest.raises(DaemonNotRunning):
                await client.status()
    finally:
        d.stop(signal.SIGKILL)


async def test_restart_restores_loaded_models(store_copy: Path, tmp_path: Path) -> None:
    home = tmp_path / "d"
    d = start_daemon(home, store_copy)
    try:
        async with LastmileClient(d.socket) as client:
            await client.load("demo-mlp", {"max_batch_size": 4})
        assert d.stop() == 0
        d = start_daemon(home, store_copy)
        async with LastmileClient(d.socket) as client:
            model = await client.model("demo-mlp")
            assert model["state"] == "ready"
            assert model["settings"]["max_batch_size"] == 4
            events = [e["kind"] for e in await client.events()]
            assert "loaded" in events
    finally:
        d.stop()


async def test_model_that_fails_to_restore_is_reported_not_fatal(store_copy: Path, tmp_path: Path) -> None:
    home = tmp_path / "d"
    home.mkdir()
    (home / "state.json").write_text('{"version": 1, "models": {"no-such-model": {}, "demo-mlp": {}}}')
    d = start_daemon(home, store_copy)
    try:
        async with LastmileClient(d.socket) as client:
            assert (await client.model("demo-mlp"))["state"] == "ready"
            failed = [e for e in await client.events() if e["kind"] == "restore_failed"]
            assert failed and "no-such-model" in failed[0]["message"]
            state = json.loads((home / "state.json").read_text())["models"]
            assert set(state) == {"no-such-model", "demo-mlp"}, "a failed restore stays in the state for the next start"
            await client.unload("no-such-model")
            assert set(json.loads((home / "state.json").read_text())["models"]) == {"demo-mlp"}
    finally:
        d.stop()


def test_unreadable_state_is_set_aside_not_overwritten(demo_store: Path, tmp_path: Path) -> None:
    home = tmp_path / "d"
    home.mkdir()
    (home / "state.json").write_text('{"version": 1, "models": {"demo-mlp": {}')  # cut short
    d = start_daemon(home, demo_store)
    d.stop()
    aside = list(home.glob("state.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"version": 1')
    assert "moved to" in d.log_text()


def test_first_start_on_empty_store_builds_demo_and_journal_mode_drops_timestamps(tmp_path: Path) -> None:
    store = tmp_path / "empty-store"
    d = start_daemon(tmp_path / "j", store, env={"JOURNAL_STREAM": "8:1234"})
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    d.stop()
    assert "libtorch" not in maps, "the demo models are built in a forkserver child, not in the daemon"
    assert {"demo-mlp", "demo-mlp-ds", "demo-lm", "demo-lm-ds"} <= {p.name for p in store.iterdir()}
    lines = [line for line in d.log_text().splitlines() if "logger=lastmile" in line]
    assert lines and all(line.startswith("level=") for line in lines), lines[:3]
    assert any("built demo models" in line for line in lines)
    d = start_daemon(tmp_path / "t", store)  # not empty any more: nothing is rebuilt
    d.stop()
    assert any(line.startswith("time=") for line in d.log_text().splitlines())
    assert "built demo models" not in d.log_text()
