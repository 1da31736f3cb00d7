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
