"""The Lastmile terminal UI: ``lastmile tui [--read-only]`` calls :func:`run_tui`.

Structure: one screen per job (dashboard, models, tune, playground, events) as Textual modes,
a help screen and a confirm dialog as modals. The live figures come from one worker reading
``/lm/v1/monitor`` (through :func:`lastmile.appliance.client.monitor.monitor`, which reconnects by itself)
and posting typed messages; the app keeps them in a :class:`~lastmile.tui.state.MonitorState` that the
screens draw from. Every other daemon call runs in a worker of the screen that asked and
reports back with a message; a failure becomes a notification carrying the daemon's words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import Worker, WorkerState

from lastmile.appliance.client.api import ApiError, ClientError, LastmileClient
from lastmile.appliance.client.monitor import monitor
from lastmile.appliance.client.wording import without_model_prefix
from lastmile.tui.commands import LastmileCommands
from lastmile.tui.messages import ConnectionChanged, SnapshotArrived
from lastmile.tui.screens.base import LastmileScreen
from lastmile.tui.screens.chat import ChatScreen
from lastmile.tui.screens.dashboard import DashboardScreen
from lastmile.tui.screens.events import EventsScreen
from lastmile.tui.screens.help import HelpScreen
from lastmile.tui.screens.models import ModelsScreen
from lastmile.tui.screens.playground import PlaygroundScreen
from lastmile.tui.screens.tune import TuneScreen
from lastmile.tui.state import MonitorState
from lastmile.tui.widgets.chrome import StatusBar


class LastmileApp(App[int]):
    CSS_PATH = Path(__file__).with_name("lastmile.tcss")
    TITLE = "lastmile"
    MODES = {
        "dashboard": DashboardScreen,
        "models": ModelsScreen,
        "tune": TuneScreen,
        "playground": PlaygroundScreen,
        "events": EventsScreen,
        "chat": ChatScreen,
    }
    DEFAULT_MODE = "dashboard"
    SCREEN_TITLES = {"dashboard": "Dashboard", "models": "Models", "tune": "Tune", "playground": "Playground", "events": "Events", "chat": "Chat"}
    COMMANDS = App.COMMANDS | {LastmileCommands}
    RATES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
    BINDINGS = [
        Binding("d,f2", "switch_mode('dashboard')", "Dashboard", key_display="d"),
        Binding("m,f3", "switch_mode('models')", "Models", key_display="m"),
        Binding("t,f4", "switch_mode('tune')", "Tune", key_display="t"),
        Binding("p,f5", "switch_mode('playground')", "Playground", key_display="p"),
        Binding("e,f6", "switch_mode('events')", "Events", key_display="e"),
        Binding("c,f7", "switch_mode('chat')", "Chat", key_display="c"),
        Binding("space", "toggle_pause", "Pause"),
        Binding("plus,equals_sign", "faster", "Faster", key_display="+"),
        Binding("minus", "slower", "Slower", key_display="-"),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "leave_field", "Leave field", show=False),
    ]

    def __init__(self, client: LastmileClient, *, read_only: bool = False, rate_hz: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.read_only = read_only
        self.rate_hz = rate_hz
        self.paused = False
        self.state = MonitorState()
        self.store_names: list[str] = []
        self.errors: list[str] = []  # every error shown, newest last (tests and the events pane read it)
        self._loaded_names: tuple[str, ...] | None = None

    # --- life cycle -----------------------------------------------------------------------

    def on_mount(self) -> None:
        self.sub_title = self.client.where + (" (read-only)" if self.read_only else "")
        self.stream(self.rate_hz)
        self.fetch_store_names()

    async def on_unmount(self) -> None:
        await self.client.close()

    @work(group="monitor", exclusive=True, exit_on_error=False)
    async def stream(self, rate_hz: float) -> None:
        """The monitor stream for the app's whole life (restarted with a new rate)."""
        try:
            async for item in monitor(self.client, rate_hz):
                if "connection" in item:
                    self.post_message(ConnectionChanged(item))
                elif item.get("type") == "snapshot":
                    self.post_message(SnapshotArrived(item))
                elif item.get("type") == "error":
                    self.report_error(f"monitor: {item.get('error')}")
        except ClientError as exc:  # only a refused rate ends the stream
            self.report_error(f"monitor stream: {exc}")

    @work(group="store-names", exclusive=True, exit_on_error=False)
    async def fetch_store_names(self) -> None:
        try:
            listing = await self.client.models()
        except ClientError:
            return
        self.store_names = [e["name"] for e in listing.get("store", []) if not e.get("error")]

    # --- monitor messages -----------------------------------------------------------------

    def _main_screens(self) -> list[LastmileScreen]:
        """The screens to redraw: those of the current mode that are fully composed (a
        snapshot may arrive while a screen is still being built or already closing)."""
        return [s for s in self.screen_stack if isinstance(s, LastmileScreen) and s.is_mounted and s.query(StatusBar)]

    def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        self.state.ingest(message.snapshot)
        names = tuple(sorted(r["name"] for r in self.state.models))
        if names != self._loaded_names:
            self._loaded_names = names
            self.fetch_store_names()
        for screen in self._main_screens():
            screen.update_chrome()
            if not self.paused:
                screen.refresh_from(self.state)

    def on_connection_changed(self, message: ConnectionChanged) -> None:
        kind = message.marker.get("connection")
        self.state.mark(message.marker)
        if kind == "lost":
            self.notify(escape(f"connection to the daemon lost: {message.marker.get('error')}; retrying"), severity="warning", timeout=4)
        elif kind == "restored":
            self.notify("connection to the daemon restored", timeout=3)
        for screen in self._main_screens():
            screen.update_chrome()
            if not self.paused and self.state.snapshot is not None:
                screen.refresh_from(self.state)  # rows turn "unknown" at once, not at the next snapshot

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A worker that died of something unexpected: a notification, never a traceback."""
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.report_error(f"{event.worker.name or 'background task'} failed: {type(error).__name__}: {error}")

    # --- helpers the screens use -----------------------------------------------------------

    def report_error(self, message: str, *, model: str | None = None) -> None:
        """A daemon (or form) error, as the operator should read it: the daemon's words
        verbatim (markup escaped, so ``[ONNXRuntimeError]`` stays), and the model named once."""
        if model:
            message = f"{model}: {without_model_prefix(model, message)}"
        self.errors.append(message)
        self.notify(escape(message), title="error", severity="error", timeout=8)

    def writable(self, what: str) -> bool:
        """False (and says why) in read-only mode: the one gate of every changing action."""
        if self.read_only:
            self.notify(f"read-only mode: cannot {what}", severity="warning")
            return False
        return True

    def set_rate(self, rate_hz: float) -> None:
        self.rate_hz = rate_hz
        self.stream(rate_hz)
        for screen in self._main_screens():
            screen.update_chrome()
        self.notify(f"updates every {1 / rate_hz:g} s ({rate_hz:g} Hz)", timeout=2)

    def open_on(self, mode: str, name: str) -> None:
        """Show ``mode``'s screen with model ``name`` picked (from the command palette)."""
        self.switch_mode(mode)
        self.call_after_refresh(lambda: getattr(self.screen, "select_model", lambda n: None)(name))

    def open_detail(self, name: str) -> None:
        """The detail view of loaded model ``name`` over the current screen."""
        from lastmile.tui.screens.detail import ModelDetailScreen

        self.push_screen(ModelDetailScreen(name))

    def confirm_on_models(self, action: str, name: str) -> None:
        if not self.writable(f"{action} {name}"):
            return
        self.switch_mode("models")

        def ask() -> None:
            screen = self.screen
            if isinstance(screen, ModelsScreen):
                screen.confirm(action, name)

        self.call_after_refresh(ask)

    # --- actions --------------------------------------------------------------------------

    def action_leave_field(self) -> None:
        """Escape out of a text field, so the one-letter keys work again."""
        self.screen.set_focus(None)

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        for screen in self._main_screens():
            screen.update_chrome()
            if not self.paused and self.state.snapshot is not None:
                screen.refresh_from(self.state)

    def action_faster(self) -> None:
        faster = [r for r in self.RATES if r > self.rate_hz]
        if faster:
            self.set_rate(faster[0])

    def action_slower(self) -> None:
        slower = [r for r in self.RATES if r < self.rate_hz]
        if slower:
            self.set_rate(slower[-1])

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        sections: list[tuple[str, list[Any]]] = [("anywhere", list(self.BINDINGS))]
        for mode, screen_type in self.MODES.items():
            mutating = getattr(screen_type, "MUTATING_ACTIONS", ())
            bindings = [b for b in screen_type.BINDINGS if not (self.read_only and isinstance(b, Binding) and b.action in mutating)]
            sections.append((self.SCREEN_TITLES[mode], bindings))
        self.push_screen(HelpScreen(sections, self.read_only))


def run_tui(client: LastmileClient, *, read_only: bool) -> int:
    """Run the TUI until the operator quits; the exit code of ``lastmile tui``."""
    app = LastmileApp(client, read_only=read_only)
    try:
        app.run()
    except ApiError as exc:  # pragma: no cover - every call runs in a worker that catches
        print(f"lastmile tui: {exc}")
        return exc.exit_code
    return app.return_code or 0
