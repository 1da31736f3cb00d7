"""The operator's experience in the TUI, driven by Textual's Pilot against a real daemon with every demo model
loaded, at the two sizes an operator meets: 80x24 (a laptop terminal, a serial console) and
140x45. What must hold at both: every loaded model in view, the primary columns whole, Help
and Quit in the footer, Enter opening the detail view."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text
from textual.widget import Widget
from textual.widgets._footer import FooterKey

from lastmile.appliance.client.api import LastmileClient
from lastmile.tui.app import LastmileApp
from lastmile.tui.commands import LastmileCommands
from lastmile.tui.screens.dashboard import DashboardScreen
from lastmile.tui.screens.detail import ModelDetailScreen, setting_sources
from lastmile.tui.screens.tune import TuneScreen
from lastmile.tui.state import MonitorState, memory_used
from lastmile.tui.widgets.events_log import event_line
from lastmile.tui.widgets.gauge import Gauge
from lastmile.tui.widgets.models_table import COLUMNS, ModelsTable
from tests.conftest import DaemonProc
from tests.tui.conftest import wait_until

def plain(widget: Widget) -> str:
    """What a Static shows, as text (its content may be a rich Table)."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(widget.content)  # type: ignore[attr-defined]
    return console.export_text()


def composed(app: LastmileApp, kind: type, widget_id: str) -> bool:
    return isinstance(app.screen, kind) and bool(app.screen.query(widget_id))


DEMO = ("demo-mlp", "demo-mlp-ds", "demo-mlp-ts", "demo-lm", "demo-lm-ds")
PRIMARY = [c.key for c in COLUMNS if c.priority == 0]  # name, state, req/s, errors, memory


async def _load_all(client: LastmileClient) -> None:
    loaded = {m["name"] for m in (await client.models())["loaded"]}
    for name in DEMO:
        if name not in loaded:
            await client.load(name)


@pytest.mark.parametrize("size", [(80, 24), (140, 45)], ids=["80x24", "140x45"])
async def test_small_and_large_terminals_show_every_model_whole(tui_daemon: DaemonProc, size: tuple[int, int]) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        await _load_all(client)
        runners = {m["name"]: [r["pid"] for r in m["runners"]] for m in (await client.models())["loaded"]}
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=size) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            table = app.screen.query_one(ModelsTable)
            await wait_until(lambda: set(DEMO) <= set(table.visible_names()), step=step, what="every demo model in the table")
            await pilot.pause(0.3)
            # every row in view (the table's own height holds header + rows), no column cut
            assert table.region.height >= 1 + table.row_count, (table.region, table.row_count)
            shown = [c.key for c in table.shown_columns]
            assert set(PRIMARY) <= set(shown), shown
            widths = sum(column.get_render_width(table) for column in table.columns.values())
            assert widths <= table.size.width, (widths, table.size.width)
            if size[0] >= 140:
                assert {"p50", "p99", "queue", "requests"} <= set(shown)
            # the footer keeps Help and Quit, inside the screen
            keys = {k.action: k for k in app.screen.query(FooterKey)}
            for action in ("help", "quit"):
                assert action in keys, sorted(keys)
                assert keys[action].region.right <= size[0] and keys[action].region.width > 0
            assert "open_detail" in keys  # Enter shows in the footer too
            # Enter opens the highlighted model's detail view
            table.focus()
            name = table.selected
            await pilot.press("enter")
            await wait_until(lambda: composed(app, ModelDetailScreen, "#detail-runners"), step=step, what="the detail view")
            detail = app.screen
            assert detail.model_name == name
            await wait_until(lambda: str(runners[name][0]) in plain(detail.query_one("#detail-runners")), step=step,
                             what="the runner's pid in the detail view")
            settings = plain(detail.query_one("#detail-settings"))
            assert "max_batch_size" in settings
            detail_keys = {k.action for k in detail.query(FooterKey)}
            assert {"unload", "reload", "tune", "help", "quit"} <= detail_keys, detail_keys
            await pilot.press("escape")
            await wait_until(lambda: isinstance(app.screen, DashboardScreen), step=step, what="back on the dashboard")
            assert app.errors == []


async def test_detail_view_shows_errors_events_and_tunes(tui_daemon: DaemonProc) -> None:
    """A failing request shows in the Errors column and the detail view (its last error,
    brackets and all); `t` there opens the tune screen on that model."""
    async with LastmileClient(tui_daemon.socket) as client:
        await _load_all(client)
        bad = np.full((1, 8), 100_000, np.int64)  # token ids past the vocabulary: ONNX Runtime fails
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=(100, 30)) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            table = app.screen.query_one(ModelsTable)
            await wait_until(lambda: "demo-lm" in table.visible_names(), step=step, what="demo-lm")
            with pytest.raises(Exception):
                await client.infer("demo-lm", {"input_ids": bad}, {"input_ids": "INT64"})
            await wait_until(lambda: "(" in (table.cell_text("demo-lm", "errors") or ""), step=step, what="the Errors column")
            app.open_detail("demo-lm")
            await wait_until(lambda: composed(app, ModelDetailScreen, "#detail-errors"), step=step, what="the detail view")
            errors = app.screen.query_one("#detail-errors")
            await wait_until(lambda: "[ONNXRuntimeError]" in plain(errors), step=step, what="the last error, brackets kept")
            assert "demo-lm: model 'demo-lm'" not in plain(errors)
            await pilot.press("t")
            await wait_until(lambda: isinstance(app.screen, TuneScreen) and app.screen.model_name == "demo-lm", step=step,
                             what="the tune screen on demo-lm")


async def test_sorting_by_memory_orders_by_the_figure_shown(tui_daemon: DaemonProc) -> None:
    async with LastmileClient(tui_daemon.socket) as client:
        await _load_all(client)
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=(140, 45)) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            table = app.screen.query_one(ModelsTable)
            await wait_until(lambda: set(DEMO) <= set(table.visible_names()), step=step, what="the demo models")
            table.sort_by("memory", reverse=False)
            rows = {r["name"]: r for r in app.state.models}
            used = [memory_used(rows[n]) or 0 for n in table.visible_names()]
            assert used == sorted(used)


async def test_palette_load_on_a_loaded_model_offers_load_first(tui_daemon: DaemonProc) -> None:
    """Typing "load demo-lm-ds" with demo-lm-ds loaded ranks "Load demo-lm-ds" first,
    not "Unload demo-lm-ds"."""
    async with LastmileClient(tui_daemon.socket) as client:
        await _load_all(client)
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=(100, 30)) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            await wait_until(lambda: "demo-lm-ds" in app.store_names and app.state.model("demo-lm-ds") is not None, step=step,
                             what="the store listing")
            provider = LastmileCommands(app.screen, None)
            ranked = provider.ranked("load demo-lm-ds")
            assert ranked[0][1] == "Load demo-lm-ds", ranked[:3]


async def test_error_popups_keep_brackets_and_name_the_model_once(tui_daemon: DaemonProc) -> None:
    app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=1)
    async with app.run_test(size=(100, 30)) as pilot:
        app.report_error("mynet: model 'mynet': ONNX Runtime failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT", model="mynet")
        await pilot.pause(0.2)
        assert app.errors[-1] == "mynet: ONNX Runtime failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT"
        shown = [n.message for n in app._notifications]
        assert any("[ONNXRuntimeError]" in Text.from_markup(m).plain for m in shown), shown


def test_tune_keys_mean_one_thing() -> None:
    """`t` is the Tune screen everywhere; the auto-tuner on that screen is `o`."""
    keys = {b.key: b.action for b in TuneScreen.BINDINGS}
    assert keys.get("o") == "autotune" and "t" not in keys


def test_event_lines_separate_level_and_kind() -> None:
    line = event_line({"time": 0, "level": "warning", "kind": "load_refused", "message": "no"}).plain
    assert "warning load_refused" in line


async def test_gauge_labels_its_markers() -> None:
    from textual.app import App

    class One(App):
        def compose(self):
            yield Gauge("mem host", id="g")

    app = One()
    async with app.run_test(size=(120, 3)) as pilot:
        gauge = app.query_one(Gauge)
        gauge.set(100, 1000, "100 B used / budget 800 B", budget=800, low=0.8, high=0.9, short_text="100 B / 800 B")
        await pilot.pause()
        text = gauge.render().plain
        assert "┊low ┃high ▕budget" in text and "100 B used" in text


def test_busiest_model_leads_the_charts_and_sources_are_named() -> None:
    state = MonitorState()
    for rps in (0.0, 5.0, 9.0):
        state.ingest({"models": [{"name": "a", "requests_per_s": 0.0, "latency_ms": {}}, {"name": "b", "requests_per_s": rps, "latency_ms": {}}]})
    assert state.busiest() == "b"
    rows = dict((k, src) for k, _, src in setting_sources({"max_batch_size": 4, "dtype": "fp32", "threads": 1},
                                                          {"threads": 1}, {"max_batch_size": 4}))
    assert rows == {"max_batch_size": "manifest", "dtype": "defaults", "threads": "load/tune"}



async def test_tune_result_shows_under_the_picker_at_140x45(tui_daemon: DaemonProc) -> None:
    """The outcome of a change (and of an auto-tune run, same place) is in view at the
    top of the form, not below the fold."""
    async with LastmileClient(tui_daemon.socket) as client:
        await _load_all(client)
        app = LastmileApp(LastmileClient(tui_daemon.socket), rate_hz=5)
        async with app.run_test(size=(140, 45)) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            await wait_until(lambda: app.state.model("demo-mlp-ts") is not None, step=step, what="the snapshot")
            app.open_on("tune", "demo-mlp-ts")
            await wait_until(lambda: composed(app, TuneScreen, "#tune-verdict") and app.screen.model_name == "demo-mlp-ts",
                             step=step, what="the tune screen on demo-mlp-ts")
            screen = app.screen
            current = app.state.model("demo-mlp-ts")["settings"]["max_batch_size"]
            await pilot.pause(0.5)
            screen.query_one("#t-max_batch_size").value = str(current + 1)
            await pilot.press("a")
            verdict = screen.query_one("#tune-verdict")
            await wait_until(lambda: "applied to demo-mlp-ts" in plain(verdict), step=step, what="the verdict")
            assert verdict.region.bottom <= 45 and verdict.region.height > 0
            assert (await client.model("demo-mlp-ts"))["settings"]["max_batch_size"] == current + 1
