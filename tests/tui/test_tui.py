"""The TUI driven by Textual's Pilot against a real daemon on a temp socket with the demo
models: live figures move under real traffic, a load through the form reports its phases,
tuning reaches the daemon, read-only mode changes nothing, and a stopped daemon shows the
banner until it is back."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np

from lastmile.appliance.client.api import LastmileClient
from tests.conftest import DaemonProc, start_daemon
from tests.tui.conftest import wait_until
from lastmile.tui.app import LastmileApp
from lastmile.tui.commands import LastmileCommands
from lastmile.tui.screens.models import ModelsScreen
from lastmile.tui.screens.tune import TuneScreen
from lastmile.tui.widgets.chrome import Banner
from lastmile.tui.widgets.models_table import ModelsTable

SIZE = (160, 48)


async def _ensure_loaded(client: LastmileClient, name: str, **params: object) -> None:
    loaded = {m["name"] for m in (await client.models())["loaded"]}
    if name not in loaded:
        await client.load(name, dict(params))


async def _traffic(client: LastmileClient, n: int) -> None:
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    await asyncio.gather(*(client.infer("demo-mlp", {"input": x}, {"input": "FP32"}) for _ in range(n)))


async def test_dashboard_shows_models_and_numbers_move_under_traffic(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        await _ensure_loaded(client, "demo-mlp")
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=10)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one(ModelsTable)
            step = lambda: pilot.pause(0.05)  # noqa: E731
            await wait_until(lambda: "demo-mlp" in table.visible_names(), step=step, what="demo-mlp in the table")
            before = int(table.cell_text("demo-mlp", "requests") or 0)
            await _traffic(client, 40)
            await wait_until(lambda: int(table.cell_text("demo-mlp", "requests") or 0) >= before + 40, step=step, what="request count to move")
            seen_rps: list[float] = []

            async def busy() -> None:
                await _traffic(client, 8)
                seen_rps.append(float((table.cell_text("demo-mlp", "rps") or "0").split()[0]))

            await wait_until(lambda: any(v > 0 for v in seen_rps), step=busy, what="req/s above 0")
            p50 = table.cell_text("demo-mlp", "p50") or "-"
            assert p50 != "-" and float(p50) > 0
            assert max(app.state.series["demo-mlp"].rps) > 0  # the sparkline's history moved too
            # filter and sort keys work on the live table
            await pilot.press("slash", "z", "z", "z", "enter")
            assert table.row_count == 0
            await pilot.press("escape")
            assert "demo-mlp" in table.visible_names()
            await pilot.press("s")
            assert table.sort_key != "requests"
            assert app.errors == []


async def screen_after(app: LastmileApp, pilot, key: str, kind: type) -> Any:
    """Press ``key`` and return the screen it opened (of ``kind``)."""
    await pilot.press(key)
    assert isinstance(app.screen, kind), app.screen
    return app.screen

async def test_load_through_the_form_shows_progress(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        if "demo-mlp-ds" in {m["name"] for m in (await client.models())["loaded"]}:
            await client.unload("demo-mlp-ds")
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=SIZE) as pilot:
            step = lambda: pilot.pause(0.05)  # noqa: E731
            screen = await screen_after(app, pilot, "m", ModelsScreen)
            await wait_until(lambda: any(e["name"] == "demo-mlp-ds" for e in screen.store), step=step, what="the store listing")
            screen.select_model("demo-mlp-ds")
            screen.query_one("#f-max_batch_size").value = "4"
            screen.query_one("#f-dtype").value = "fp32"
            # the form shows the daemon's own dry-run estimate for these settings (not a made-up number)
            truth = await client.request("POST", "/lm/v1/memory/estimate", {"model": "demo-mlp-ds", "parameters": {"max_batch_size": 4, "dtype": "fp32"}})
            await wait_until(lambda: (screen.last_estimate or {}).get("estimate") == truth["estimate"], step=step, what="the estimate for batch 4")
            assert f"{truth['estimate']['total_bytes'] / 2**20:.1f} MiB" in str(screen.query_one("#estimate").content)
            # a bad value is refused in the form, before the daemon sees it
            screen.query_one("#f-max_delay_ms").value = "-3"
            await pilot.press("l")
            assert app.errors and "max_delay_ms" in app.errors[-1]
            assert app.focused is screen.query_one("#f-max_delay_ms")  # the bad field has the cursor
            screen.query_one("#f-max_delay_ms").value = ""
            await pilot.press("escape", "l")
            phase_text = lambda: str(screen.query_one("#load-phase").content)  # noqa: E731
            await wait_until(lambda: screen.busy is None and ("done" in phase_text() or "failed" in phase_text()), timeout=60, step=step,
                             what=lambda: f"the load to finish; phase {phase_text()!r}, errors {app.errors}, stack {app.screen_stack}")
            assert app.errors[1:] == [], app.errors
            progress = screen.query_one("#load-progress")
            assert progress.display and progress.progress == progress.total
            took = float(re.search(r"done in ([0-9.]+) s", phase_text()).group(1))
            # the phase is polled every 0.1 s: a load that long shows where it is on the way
            assert took < 0.4 or any(p in screen.phases_seen for p in ("spawning", "loading", "warming")), (took, screen.phases_seen)
            row = await client.model("demo-mlp-ds")
            assert row["state"] == "ready" and row["settings"]["max_batch_size"] == 4 and row["backend"] == "deepspeed"
            # the daemon's own refusal comes back as an error notification with its message
            screen.select_model("demo-mlp")
            screen.query_one("#f-backend").value = "deepspeed"
            screen.query_one("#f-max_batch_size").value = ""
            before = len(app.errors)
            await pilot.press("escape", "l")
            await pilot.pause(0.3)
            if isinstance(app.screen, ModelsScreen):  # demo-mlp not loaded: no confirmation asked
                pass
            else:
                await pilot.press("y")
            await wait_until(lambda: len(app.errors) > before and screen.busy is None, timeout=30, step=step, what="the daemon's error")
            assert "onnx" in app.errors[-1].lower()
        await client.unload("demo-mlp-ds")


async def test_tuning_changes_the_daemon_settings(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        await _ensure_loaded(client, "demo-mlp")
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=SIZE) as pilot:
            step = lambda: pilot.pause(0.05)  # noqa: E731
            screen = await screen_after(app, pilot, "t", TuneScreen)
            await wait_until(lambda: "demo-mlp" in screen._names, step=step, what="loaded models in the tune form")
            screen.select_model("demo-mlp")
            await pilot.pause(0.1)
            current = (await client.model("demo-mlp"))["settings"]
            new_batch = 5 if current["max_batch_size"] != 5 else 6
            screen.query_one("#t-max_batch_size").value = str(new_batch)
            screen.query_one("#t-max_delay_ms").value = "3.5"
            await pilot.press("a")
            await wait_until(lambda: "applied" in str(screen.query_one("#tune-result").content), timeout=15, step=step, what="tune applied")
            settings = (await client.model("demo-mlp"))["settings"]
            assert settings["max_batch_size"] == new_batch and settings["max_delay_ms"] == 3.5
            # the live figures panel shows the new settings from the stream
            await wait_until(lambda: f"max batch {new_batch}" in str(screen.query_one("#live-figures").content), step=step, what="live settings")
            # out of range: refused in the form, nothing sent
            screen.query_one("#t-max_batch_size").value = "0"
            await pilot.press("a")
            assert "max_batch_size" in app.errors[-1]
            assert (await client.model("demo-mlp"))["settings"]["max_batch_size"] == new_batch


async def test_read_only_mode_cannot_change_anything(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        await _ensure_loaded(client, "demo-mlp")
        before = {m["name"]: m["settings"] for m in (await client.models())["loaded"]}
        app = LastmileApp(LastmileClient(tui_daemon.socket), read_only=True, rate_hz=5)
        async with app.run_test(size=SIZE) as pilot:
            step = lambda: pilot.pause(0.05)  # noqa: E731
            await wait_until(lambda: app.state.model("demo-mlp") is not None, step=step, what="a snapshot")
            await pilot.press("m")
            models = app.screen
            assert isinstance(models, ModelsScreen)
            assert not models.query_one("#load-form").display  # the load form and its buttons are hidden
            assert not models.check_action("load", ()) and not models.check_action("unload", ())
            await pilot.press("l", "u", "R")  # the keys do nothing
            models.action_load()  # and the actions refuse even when called directly
            models.confirm("unload", "demo-mlp")
            await pilot.pause(0.2)
            await pilot.press("y")  # would confirm an unload dialog if one had opened
            await pilot.press("t")
            tune = app.screen
            assert isinstance(tune, TuneScreen)
            assert not tune.query_one("#tune-buttons").display
            await wait_until(lambda: tune.model_name == "demo-mlp", step=step, what="tune form")
            tune.query_one("#t-max_batch_size").value = "3"
            await pilot.press("a")
            tune.action_apply()
            app.confirm_on_models("unload", "demo-mlp")
            await pilot.pause(0.5)
            texts = [text for text, _, _ in LastmileCommands(app.screen)._commands()]
            assert not any(t.startswith(("Load ", "Unload ", "Reload ", "Tune ")) for t in texts), texts
            assert any(t.startswith("Go to") for t in texts)
        after = {m["name"]: m["settings"] for m in (await client.models())["loaded"]}
        assert after == before


async def test_daemon_stop_shows_the_banner_and_recovery_clears_it(store_copy: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = start_daemon(home, store_copy)
    try:
        app = LastmileApp(LastmileClient(proc.socket), rate_hz=5)
        async with app.run_test(size=SIZE) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            banner = app.screen.query_one(Banner)
            await wait_until(lambda: app.state.connection.state == "ok" and not banner.display, step=step, what="connected")
            await asyncio.to_thread(proc.stop)
            await wait_until(lambda: banner.display and "LOST" in str(banner.content), timeout=15, step=step, what="the banner")
            assert banner.has_class("-lost")
            # The banner says how to start the daemon
            await wait_until(lambda: "lastmile serve" in str(banner.content), timeout=15, step=step, what="how to start it")
            assert "systemctl start lastmile" in str(banner.content)
            await pilot.press("m")  # other screens show it too, and nothing crashes while it is down
            await wait_until(lambda: app.screen.query_one(Banner).display, step=step, what="the banner on the models screen")
            await pilot.press("d")
            # not waiting for ready: the stream answers as soon as the socket is bound, while the
            # daemon still starts up, and the banner must clear then
            proc = await asyncio.to_thread(start_daemon, home, store_copy, wait_ready=False)
            await wait_until(lambda: not banner.display and app.state.connection.state == "ok", timeout=60, step=step, what="recovery")
            assert app.state.daemon["pid"] == proc.proc.pid
            assert not [e for e in app.errors if "Traceback" in e]
    finally:
        proc.stop()
