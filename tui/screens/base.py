"""What every main screen shares: the status bar and connection banner on top, the footer of
key bindings below, and a hook called with fresh monitor state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.events import Resize
from textual.screen import Screen
from textual.widgets import Select

from lastmile.appliance.client.api import ClientError
from lastmile.tui.messages import StoreListed
from lastmile.tui.state import MonitorState
from lastmile.tui.widgets.chrome import Banner, StatusBar
from lastmile.tui.widgets.footer import KeysFooter

if TYPE_CHECKING:
    from lastmile.tui.app import LastmileApp


class LastmileScreen(Screen):
    """Subclasses write :meth:`compose_body` and :meth:`refresh_from`; widgets with the
    ``mutating`` class are hidden in read-only mode."""

    AUTO_FOCUS = ""  # no field takes the keys on arrival: the one-letter keys work at once
    NARROW_COLUMNS = 110  # narrower than this, the screen has the -narrow class (its CSS stacks what sat side by side)

    @property
    def lm(self) -> "LastmileApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusBar(id="statusbar")
        yield Banner(id="banner")
        yield from self.compose_body()
        yield KeysFooter()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_resize(self, event: Resize) -> None:
        self.set_class(event.size.width < self.NARROW_COLUMNS, "-narrow")

    def on_mount(self) -> None:
        self.set_class(self.app.size.width < self.NARROW_COLUMNS, "-narrow")
        if self.lm.read_only:
            for widget in self.query(".mutating"):
                widget.display = False
        self.update_chrome()

    def on_screen_resume(self) -> None:
        self.update_chrome()
        self.redraw()

    def update_chrome(self) -> None:
        app = self.lm
        self.query_one(StatusBar).show(app.state, where=app.client.where, rate_hz=app.rate_hz, paused=app.paused, read_only=app.read_only)
        self.query_one(Banner).show(app.state, where=app.client.where)

    def refresh_from(self, state: MonitorState) -> None:
        """Fresh figures arrived (not called while paused)."""

    def redraw(self) -> None:
        """Draw the latest figures now, when there are any (a screen just shown or resumed, a
        late answer that changes what is drawn)."""
        if self.lm.state.snapshot is not None:
            self.refresh_from(self.lm.state)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Read-only mode: actions that change the daemon are neither shown nor run."""
        if self.lm.read_only and action in getattr(self, "MUTATING_ACTIONS", ()):
            return False
        return True

    @work(group="store", exclusive=True, exit_on_error=False)
    async def fetch_store(self) -> None:
        """Ask for the store listing (what can be loaded, with each manifest's settings); it
        comes back to this screen as :class:`StoreListed`, for screens that show the store."""
        try:
            listing = await self.lm.client.models()
        except ClientError as exc:
            self.store_unavailable(exc)
            return
        self.post_message(StoreListed(listing))

    def store_unavailable(self, exc: ClientError) -> None:
        """The listing did not come. Nothing more is said by default: the banner already
        covers a dead daemon, and a screen that needs the listing says so itself."""


class ModelPickerScreen(LastmileScreen):
    """A screen about one loaded model, chosen in the ``Select`` whose id is ``PICKER_ID``."""

    PICKER_ID = ""
    _names: tuple[str, ...] = ()

    @property
    def model_name(self) -> str | None:
        value = self.query_one(f"#{self.PICKER_ID}", Select).value
        return value if isinstance(value, str) else None

    def select_model(self, name: str) -> None:
        if name in self._names:
            self.query_one(f"#{self.PICKER_ID}", Select).value = name

    def set_model_names(self, names: tuple[str, ...]) -> None:
        """New choices, keeping the current one when it is still there."""
        if names == self._names:
            return
        select = self.query_one(f"#{self.PICKER_ID}", Select)
        current = self.model_name
        self._names = names
        select.set_options([(n, n) for n in names])
        if current in names:
            select.value = current
        elif names:
            select.value = names[0]
