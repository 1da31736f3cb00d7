"""The operator's first hour in the TUI, at 80x24 and 120x40, with no daemon (synthetic
monitor snapshots, see ``offline.py``): the chat box takes the keys on arrival, the chat
uses the CLI's sampling defaults, confirm dialogs say and take Enter/y and Esc/n, a dead
daemon does not leave rows green "ready", settings read the way the operator types them,
generation models show their engine and live figures, and 80x24 keeps everything reachable
and uncut."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from textual.widget import Widget
from textual.widgets import Input

from lastmile.appliance.client.chat import SamplingOptions
from lastmile.tui.screens.chat import ChatScreen
from lastmile.tui.screens.confirm import ConfirmScreen
from tests.tui.conftest import wait_until
from tests.tui.offline import SIZE_IDS, SIZES, OfflineApp, generation_row, tensor_row

sizes = pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)


def plain(widget: Widget, width: int = 300) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(widget.render() if not hasattr(widget, "content") else widget.content)  # type: ignore[attr-defined]
    return console.export_text()


def screen_text(app: OfflineApp) -> str:
    """Every character on the terminal now (what the operator reads), line by line."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def settle(pilot, app: OfflineApp, rows: list[dict], ticks: int = 2) -> None:
    for seq in range(ticks):
        app.feed(rows, seq)
        await pilot.pause(0.05)
    await pilot.pause()


# --- the chat screen ---------------------------------------------------------------------------


@sizes
async def test_chat_box_takes_the_keys_on_arrival(size: tuple[int, int]) -> None:
    """Typing a question right after `c` goes into the box, not to the screen keys (t, e, p,
    ? would have jumped through Tune, Events, Playground, Help); no Tab needed."""
    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, [generation_row()])
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen)
        box = app.screen.query_one("#c-input", Input)
        assert app.focused is box
        await pilot.press(*"tell me a poem?")
        assert isinstance(app.screen, ChatScreen), app.screen
        assert box.value == "tell me a poem?"
        # leaving and coming back: the box has the keys again
        await pilot.press("escape", "d", "c")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen) and app.focused is box


async def test_chat_uses_the_clients_sampling_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen sends what `lastmile chat` sends when nothing is changed (one default set,
    in the client library), not a 0.7 of its own: a changed client default shows in the form
    and reaches the request."""
    import dataclasses

    import lastmile.tui.screens.chat as chat_screen

    other = dataclasses.make_dataclass("OtherDefaults", [("temperature", float, 0.2), ("top_p", float, 0.5), ("max_tokens", int, 99)],
                                       bases=(SamplingOptions,))
    monkeypatch.setattr(chat_screen, "SamplingOptions", other)
    app = OfflineApp()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, [generation_row()])
        await pilot.press("c")
        await pilot.pause()
        screen = app.screen
        assert (screen.query_one("#c-temp", Input).value, screen.query_one("#c-max", Input).value) == ("0.2", "99")
        options = screen._options()
        assert (options.temperature, options.top_p, options.max_tokens) == (0.2, 0.5, 99)
    monkeypatch.undo()
    app = OfflineApp()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, [generation_row()])
        await pilot.press("c")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        assert screen._options() == SamplingOptions()
        screen.query_one("#c-temp", Input).value = "0.3"
        assert screen._options() == SamplingOptions(**{**SamplingOptions().__dict__, "temperature": 0.3})


# --- confirm dialogs ---------------------------------------------------------------------------


@sizes
@pytest.mark.parametrize("key,answer", [("enter", True), ("y", True), ("escape", False), ("n", False)])
async def test_confirm_dialog_says_and_takes_its_keys(size: tuple[int, int], key: str, answer: bool) -> None:
    app = OfflineApp()
    answers: list[bool] = []
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        app.push_screen(ConfirmScreen("Auto-tune demo-mlp? It reloads it.", "Auto-tune"), answers.append)
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, ConfirmScreen)
        hint = str(dialog.query_one("#dialog-keys").content)
        assert "Enter" in hint and "y" in hint and "Esc" in hint and "n" in hint, hint
        assert dialog.query_one("#dialog-keys").region.bottom <= size[1]
        await pilot.press(key)
        await pilot.pause()
        assert answers == [answer]
        assert not isinstance(app.screen, ConfirmScreen)


# --- a dead daemon -----------------------------------------------------------------------------


@sizes
async def test_rows_are_not_ready_after_the_daemon_died(size: tuple[int, int]) -> None:
    """The stream drops: the status bar says the daemon is unreachable and no row stays
    green "ready" (dashboard, models screen, detail view); the next snapshot makes them live."""
    from lastmile.tui.screens.detail import ModelDetailScreen
    from lastmile.tui.widgets.chrome import StatusBar
    from lastmile.tui.widgets.models_table import ModelsTable

    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        rows = [tensor_row("demo-mlp"), generation_row()]
        await settle(pilot, app, rows)
        table = app.screen.query_one(ModelsTable)
        assert table.cell_text("demo-mlp", "state") == "ready"
        app.lose()
        await pilot.pause(0.1)
        assert "unreachable" in str(app.screen.query_one(StatusBar).content)
        assert [table.cell_text(n, "state") for n in ("demo-mlp", "demo-chat")] == ["unknown", "unknown"]
        assert "ready" not in screen_text(app), screen_text(app)
        await pilot.press("m")
        await pilot.pause(0.1)
        loaded = app.screen.query_one("#loaded")
        assert all(str(loaded.get_cell(k.value, loaded.ordered_columns[1].key)) == "unknown" for k in loaded.rows)
        app.open_detail("demo-mlp")
        await wait_until(lambda: isinstance(app.screen, ModelDetailScreen) and app.screen.query("#detail-head"), step=lambda: pilot.pause(0.05))
        await pilot.pause(0.1)
        head = str(app.screen.query_one("#detail-head").content)
        assert "unknown" in head and " ready" not in head, head
        await pilot.press("escape", "d")
        await settle(pilot, app, rows)  # the daemon is back
        table = app.screen.query_one(ModelsTable)
        assert table.cell_text("demo-mlp", "state") == "ready"
        assert "unreachable" not in str(app.screen.query_one(StatusBar).content)


# --- generation models while they serve -------------------------------------------------------


@sizes
@pytest.mark.parametrize("legacy", [False, True], ids=["flat", "older-daemon"])
async def test_generation_model_row_and_detail_show_what_runs_and_its_figures(size: tuple[int, int], legacy: bool) -> None:
    """The dashboard row says what the runner runs (ORT-GenAI int4, not the deepspeed fp32
    asked for) and tokens/s instead of 0.0 req/s; at 120x40 also TTFT, running/waiting and KV;
    the detail view has them all at both sizes; the chart follows tokens/s and TTFT, never
    "p50 ... 0.00 ms" for it."""
    from lastmile.tui.screens.detail import ModelDetailScreen
    from lastmile.tui.widgets.models_table import ModelsTable

    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, [tensor_row("demo-mlp", requests_per_s=0.0), generation_row(legacy=legacy)])
        table = app.screen.query_one(ModelsTable)
        assert table.cell_text("demo-chat", "runs") == "ort-genai int4"
        assert table.cell_text("demo-chat", "rps") == "42.5 tok/s"
        assert table.cell_text("demo-mlp", "rps") == "0.0 req/s"
        text = screen_text(app)
        assert "deepspeed" not in text and "fp32" not in text.split("demo-mlp")[0]
        if size[0] >= 120:
            assert table.cell_text("demo-chat", "ttft") == "130"
            assert (table.cell_text("demo-chat", "run"), table.cell_text("demo-chat", "wait")) == ("1/4", "2")
            assert table.cell_text("demo-chat", "kv") == "12.0 MiB/96.0 MiB"
            assert table.cell_text("demo-chat", "p99") == "46.00/tok"
            labels = str(app.screen.query_one("#l-p50").content) + " " + str(app.screen.query_one("#l-p99").content)
            assert "tokens/s, demo-chat (busiest): 42.5" in labels and "TTFT p50, demo-chat (busiest): 130 ms" in labels, labels
            assert "0.00 ms" not in labels
        widths = sum(column.get_render_width(table) for column in table.columns.values())
        assert widths <= table.size.width, (widths, table.size.width)
        app.open_detail("demo-chat")
        await wait_until(lambda: isinstance(app.screen, ModelDetailScreen) and app.screen.query("#detail-head"), step=lambda: pilot.pause(0.05))
        await pilot.pause(0.1)
        head = plain(app.screen.query_one("#detail-head"), width=size[0] - 2)
        for words in ("runs ort-genai int4 on cpu", "tokens/s 42.5", "TTFT p50 130 ms p99 260 ms", "inter-token p50 22.00 ms p99 46.00 ms",
                      "running 1/4", "waiting 2", "KV used/reserved 12.0 MiB/96.0 MiB"):
            assert words in " ".join(head.split()), (words, head)
        assert "avg batch" not in head and "deepspeed" not in head


def test_generation_figures_degrade_to_dashes() -> None:
    """A generation row with nothing reported yet (a model still warming up) shows "-", not
    a crash or a made-up 0."""
    from lastmile.tui.state import generation_figures, generation_line, kv_text, runs_short
    from lastmile.tui.widgets.models_table import running_text

    row = {"name": "g", "state": "loading", "generation": {}}
    assert set(generation_figures(row).values()) == {None}
    assert runs_short(row) == "-" and kv_text(row) == "-" and running_text(row) == "-"
    assert "tokens/s -" in generation_line(row) and "TTFT p50 - ms" in generation_line(row)


# --- 80x24: nothing cut, everything reachable ------------------------------------------------


@sizes
async def test_store_and_loaded_tables_leave_out_columns_instead_of_cutting(size: tuple[int, int]) -> None:
    """Every column shown is whole (`input_ids ...`, `Limit MiB`), the columns fit the table,
    and the model names are always there."""
    from lastmile.tui.widgets.fitted_table import FittedTable

    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, [tensor_row("demo-mlp"), tensor_row("demo-lm-ds"), generation_row()])
        await pilot.press("m")
        await wait_until(lambda: app.screen.query("#store") and app.screen.query_one("#store").row_count == 2, step=lambda: pilot.pause(0.05),
                         what="the store listing")
        await pilot.pause(0.2)
        for table_id, rows in (("#store", 2), ("#loaded", 3)):
            table = app.screen.query_one(table_id, FittedTable)
            assert table.row_count == rows
            # a column is as wide as its widest cell; all of them inside the table: nothing cut at the edge
            widths = [column.get_render_width(table) for column in table.columns.values()]
            assert sum(widths) <= table.scrollable_content_region.width, (table_id, widths, table.size)
            assert table.max_scroll_x == 0
            assert table.region.right <= size[0]
            assert "name" in [c.key for c in table.shown_columns]
        loaded = app.screen.query_one("#loaded", FittedTable)
        assert loaded.cell_text("demo-chat", "runs") == "ort-genai int4"  # what runs, not "deepspeed"
        store = app.screen.query_one("#store", FittedTable)
        assert store.cell_text("demo-lm", "inputs") in (None, "input_ids INT64[-1,-1], attention_mask INT64[-1,-1]")  # whole or left out
        assert loaded.cell_text("demo-mlp", "limit") in (None, "-")


@sizes
async def test_playground_buttons_and_results_are_reachable(size: tuple[int, int]) -> None:
    from lastmile.tui.screens.playground import PlaygroundScreen

    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, [tensor_row("demo-mlp")])
        await pilot.press("p")
        await wait_until(lambda: isinstance(app.screen, PlaygroundScreen) and "demo-mlp" in app.screen.specs,
                         step=lambda: pilot.pause(0.05), what="the spec")
        screen = app.screen
        assert "onnxruntime_onnx" not in str(screen.query_one("#p-spec").content)
        await pilot.press("ctrl+r")
        await wait_until(lambda: screen.last_results, step=lambda: pilot.pause(0.05), what="the results")
        await pilot.pause(0.2)
        summary = screen.query_one("#p-summary")
        assert 0 < summary.region.height and summary.region.bottom <= size[1] - 1, summary.region  # in view, above the footer
        body = screen.query_one("#play-body")
        for widget_id in ("#b-random", "#p-output"):
            widget = screen.query_one(widget_id)
            widget.scroll_visible(animate=False)
            await pilot.pause(0.1)
            assert widget.region.height >= min(3, widget.size.height) and widget.region.bottom <= size[1] - 1, (widget_id, widget.region)
        assert body.region.bottom <= size[1] - 1


@sizes
async def test_chat_log_keeps_its_last_column_clear_of_the_scrollbar(size: tuple[int, int]) -> None:
    from rich.text import Text as RichText

    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, [generation_row()])
        await pilot.press("c")
        await pilot.pause(0.1)
        log = app.screen.query_one("#c-log")
        log.write(RichText("you: " + "a long question " * 12 + "END"))  # written before the scrollbar shows
        await pilot.pause(0.1)
        for i in range(40):
            log.write(RichText(f"demo-chat: answer {i} " + "word " * 30 + "END"))
        await pilot.pause(0.2)
        assert log.show_vertical_scrollbar
        assert max(line.cell_length for line in log.lines) <= log.scrollable_content_region.width
        bar = app.screen.query_one("#chat-bar")
        for widget in bar.children:  # the model, both fields and New chat all on the screen
            assert widget.region.right <= size[0], (widget, widget.region)


def test_tune_trial_table_fits_80_columns_and_speaks_flags() -> None:
    from lastmile.appliance.client.autotune import Trial, TuneResult
    from lastmile.tui.screens.tune import trial_line, trial_table

    settings = {"max_batch_size": 32, "max_delay_ms": 2.5, "graph_fusion": "extended", "threads": 2}
    best = Trial(dict(settings), rows_per_s=123456.7, throughput_rps=4000, p50_ms=1.25, p99_ms=12.5, avg_batch_size=8.0)
    result = TuneResult("demo-mlp", None, {}, trials=[best, Trial(dict(settings), error="boom")], best=best, applied=True)
    table = trial_table(result)
    rows = table.splitlines()[:-1]  # the header and one line per trial; the best's flags after them
    assert max(len(line) for line in rows) <= 62 and len(rows) == 3, table
    assert "{" not in table and table.splitlines()[-1] == "best (*): --max-batch-size 32 --max-delay-ms 2.5 --graph-fusion extended --threads 2"
    line = trial_line(11, 12, {"settings": settings, "rows_per_s": 1234.0, "p50_ms": 1.0, "p99_ms": 3.5, "error": None})
    assert line == "11/12    32      2.5 extended   2    1234.0    1.00    3.50" and len(line) <= 62


@sizes
async def test_tune_rows_do_not_wrap_at_80x24(size: tuple[int, int]) -> None:
    """The live figures of the tune screen: one line each, none longer than the panel."""
    from lastmile.tui.screens.tune import TuneScreen

    app = OfflineApp()
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app, [tensor_row("demo-mlp", requests=123456, latency_ms={"p50": 123.0, "p95": 456.0, "p99": 789.0},
                                             memory={"used_bytes": 300 * 2**20, "limit_bytes": 512 * 2**20, "estimate_bytes": 280 * 2**20})])
        await pilot.press("t")
        await wait_until(lambda: isinstance(app.screen, TuneScreen) and app.screen.model_name == "demo-mlp", step=lambda: pilot.pause(0.05))
        await pilot.pause(0.2)
        figures = app.screen.query_one("#live-figures")
        lines = figures.content.plain.splitlines()
        assert figures.region.height == len(lines), (figures.region, lines)  # no line wrapped
        assert max(len(line) for line in lines) <= figures.content_region.width


# --- no Python reprs or internal names -------------------------------------------------------


async def test_settings_read_as_the_operator_types_them() -> None:
    """The tune verdict, the load form's estimate and the playground say `--max-batch-size 5`,
    `lastmile load demo-mlp --memory-limit 47`, "memory-cap overhead", not
    `{'max_batch_size': 5}`, `raise_limit {...}`, `limit_machinery`, `onnxruntime_onnx`."""
    from lastmile.tui.screens.models import ModelsScreen
    from lastmile.tui.screens.tune import TuneScreen

    app = OfflineApp()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, [tensor_row("demo-mlp")])
        await pilot.press("t")
        await wait_until(lambda: isinstance(app.screen, TuneScreen) and app.screen.model_name == "demo-mlp", step=lambda: pilot.pause(0.05))
        screen = app.screen
        await pilot.pause(0.2)
        screen.query_one("#t-max_batch_size", Input).value = "5"
        await pilot.press("escape", "a")
        await wait_until(lambda: "applied" in plain(screen.query_one("#tune-verdict")), step=lambda: pilot.pause(0.05), what="the verdict")
        verdict = plain(screen.query_one("#tune-verdict"))
        assert "applied to demo-mlp: --max-batch-size 5" in verdict and "{" not in verdict, verdict
        assert all("{" not in n.message for n in app._notifications)
        await pilot.press("m")
        await wait_until(lambda: isinstance(app.screen, ModelsScreen) and app.screen.store, step=lambda: pilot.pause(0.05))
        models = app.screen
        models.select_model("demo-mlp")
        await wait_until(lambda: models.last_estimate is not None, step=lambda: pilot.pause(0.1), what="the estimate")
        estimate = " ".join(plain(models.query_one("#estimate")).split())
        assert "would fit: lastmile load demo-mlp --memory-limit 47" in estimate, estimate
        assert "memory-cap overhead 2.0 MiB" in estimate
        for internal in ("limit_machinery", "raise_limit", "{'", "memory_limit ", "_bytes"):
            assert internal not in estimate, (internal, estimate)


async def test_detail_settings_are_not_cut_at_80x24() -> None:
    """The settings table ("from: defaults") stacks under the runners on a narrow terminal
    instead of being cut to "defaul…"."""
    from lastmile.tui.screens.detail import ModelDetailScreen

    app = OfflineApp()
    async with app.run_test(size=(80, 24)) as pilot:
        row = tensor_row("demo-mlp")
        row["settings"] = {"backend": "onnxruntime", **row["settings"], "load_timeout_s": 600.0}  # as the daemon lists them
        await settle(pilot, app, [row])
        app.open_detail("demo-mlp")
        await wait_until(lambda: isinstance(app.screen, ModelDetailScreen) and app.screen.query("#detail-settings"), step=lambda: pilot.pause(0.05))
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "…" not in text, text
        assert "defaults" in text


@pytest.mark.parametrize("key,runs", [("enter", True), ("escape", False)])
async def test_enter_on_the_auto_tune_confirm_starts_it(monkeypatch: pytest.MonkeyPatch, key: str, runs: bool) -> None:
    """`o` on the tune screen asks; Enter there starts the auto-tune (it cancelled silently),
    Escape cancels."""
    from lastmile.tui.screens.tune import TuneScreen

    started: list[str] = []
    monkeypatch.setattr(TuneScreen, "run_autotune", lambda self, name: started.append(name))
    app = OfflineApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app, [tensor_row("demo-mlp")])
        await pilot.press("t")
        await wait_until(lambda: isinstance(app.screen, TuneScreen) and app.screen.model_name == "demo-mlp", step=lambda: pilot.pause(0.05))
        await pilot.press("o")
        await pilot.pause(0.1)
        assert isinstance(app.screen, ConfirmScreen)
        assert "Enter or y: Auto-tune" in str(app.screen.query_one("#dialog-keys").content)
        await pilot.press(key)
        await pilot.pause(0.1)
        assert started == (["demo-mlp"] if runs else [])


def test_estimate_options_read_as_commands() -> None:
    from lastmile.tui.wording import changes_text, option_text

    assert option_text("m", {"option": "raise_limit", "settings": {"memory_limit_mb": 47}, "estimate_bytes": 2**20}) == \
        "lastmile load m --memory-limit 47 (est 1.0 MiB)"
    assert option_text("m", {"option": "evict_idle", "evict": ["a", "b"], "settings": {}}) == "lastmile unload a; lastmile unload b"
    assert option_text("m", {"option": "raise_budget", "memory": {"host_limit_mb": 900}, "settings": {}}) == \
        "lastmile memory set --host-limit-mb 900"
    assert option_text("m", {"option": "smaller_batch", "settings": {"max_batch_size": 4, "dtype": "fp16"}}) == \
        "lastmile load m --max-batch-size 4 --dtype fp16"
    assert changes_text({"max_delay_ms": 2.0, "memory_limit_mb": None}) == "--max-delay-ms 2 no memory limit"
