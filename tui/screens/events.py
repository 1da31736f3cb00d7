"""The events screen: everything the daemon recorded (loads, failures, restarts, tuning,
mitigation steps), newest last, filterable by text and level."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Input, RichLog, Select

from lastmile.appliance.client.api import ClientError
from lastmile.tui.messages import EventsFetched
from lastmile.tui.screens.base import LastmileScreen
from lastmile.tui.state import MonitorState
from lastmile.tui.widgets.events_log import event_line

LEVELS = ("all", "info", "warning", "error")


class EventsScreen(LastmileScreen):
    BINDINGS = [Binding("slash", "focus_filter", "Filter"), Binding("g", "fetch", "Refetch")]
    DEFAULT_CSS = """
    EventsScreen #events-bar { height: 3; }
    EventsScreen #ev-filter { width: 1fr; }
    EventsScreen #ev-level { width: 20; }
    EventsScreen #ev-log { height: 1fr; }
    """

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="events-bar"):
            yield Input(placeholder="filter events (/): text in kind, model or message", id="ev-filter")
            yield Select([(lv, lv) for lv in LEVELS], value="all", allow_blank=False, id="ev-level")
        yield RichLog(id="ev-log", wrap=True, markup=False, max_lines=5000)

    def on_mount(self) -> None:
        super().on_mount()
        self._shown: list[dict] = []
        self._seen = 0
        self.fetch()

    @work(group="events", exclusive=True, exit_on_error=False)
    async def fetch(self) -> None:
        """The full history (the stream only brings the last couple of hundred at connect)."""
        try:
            events = await self.lm.client.events(0)
        except ClientError:
            return
        self.post_message(EventsFetched(events))

    def on_events_fetched(self, message: EventsFetched) -> None:
        self._shown = list(message.events)
        self._seen = len(self.lm.state.events)
        self.redraw()

    def refresh_from(self, state: MonitorState) -> None:
        events = list(state.events)
        if self._seen > len(events):
            self._seen = 0
        fresh = events[self._seen:]
        self._seen = len(events)
        known = {(e["seq"], e["time"]) for e in self._shown[-600:]}
        added = [e for e in fresh if (e["seq"], e["time"]) not in known]
        self._shown.extend(added)
        log = self.query_one("#ev-log", RichLog)
        for event in added:
            if self._matches(event):
                log.write(event_line(event))

    def _matches(self, event: dict) -> bool:
        needle = self.query_one("#ev-filter", Input).value.lower().strip()
        level = self.query_one("#ev-level", Select).value
        if level not in ("all", None) and event.get("level") != level:
            return False
        if needle:
            hay = f"{event.get('kind', '')} {event.get('model') or ''} {event.get('message', '')}".lower()
            return needle in hay
        return True

    def redraw(self) -> None:
        log = self.query_one("#ev-log", RichLog)
        log.clear()
        for event in self._shown:
            if self._matches(event):
                log.write(event_line(event))

    def on_input_changed(self, event: Input.Changed) -> None:
        self.redraw()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.redraw()

    def action_focus_filter(self) -> None:
        self.query_one("#ev-filter", Input).focus()
