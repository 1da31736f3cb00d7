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


async def test_chat_uses_the_clients_sampling_defaults() -> None:
    """The screen sends what `lastmile chat` sends when nothing is changed (one default set,
    in the client library), not a 0.7 of its own."""
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
