"""One model in detail (Enter on a dashboard row): its runner processes, the settings in
effect and where each came from, memory used against its estimate and limit over time, its
errors, and its recent events; unload, reload and tune from here.

Figures come from the same monitor snapshots as the dashboard; only where the settings came
from needs the store listing (the manifest's ``[settings]``), fetched once when it opens."""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, RichLog, Sparkline, Static

from lastmile.appliance.client.api import ApiError, ClientError
from lastmile.appliance.client.wording import without_model_prefix
from lastmile.tui.messages import LoadFinished, StoreListed
from lastmile.tui.screens.base import LastmileScreen
from lastmile.tui.screens.confirm import STOPS_SERVING, STOPS_SERVING_KEYS, ConfirmScreen
from lastmile.tui.state import (MonitorState, fmt_bytes, fmt_memory, fmt_ms, fmt_rate, fmt_time, generation_line, is_generation,
                                memory_limit, runs_long)
from lastmile.tui.widgets.events_log import event_line
from lastmile.tui.widgets.models_table import STATE_STYLE


def setting_sources(settings: dict[str, Any], overrides: dict[str, Any], manifest: dict[str, Any] | None) -> list[tuple[str, Any, str]]:
    """``(key, value, source)`` for each effective setting: ``load/tune`` when the load request
    (or a later tune) set it, ``manifest`` when the model's ``[settings]`` did, else ``defaults``
    (the config's ``[defaults]`` or the built-in value). The same layering as the daemon's."""
    rows = []
    for key, value in settings.items():
        if key in overrides:
            source = "load/tune"
        elif manifest is not None and key in manifest:
            source = "manifest"
        elif manifest is None:
            source = "defaults or manifest"  # the store listing has not come (or the model left the store)
        else:
            source = "defaults"
        rows.append((key, value, source))
    return rows


class ModelDetailScreen(LastmileScreen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), *STOPS_SERVING_KEYS, Binding("t", "tune", "Tune it")]
    MUTATING_ACTIONS = ("unload", "reload")
    DEFAULT_CSS = """
    ModelDetailScreen #detail-body { height: 1fr; padding: 0 1; }
    ModelDetailScreen #detail-head { height: auto; }
    ModelDetailScreen #detail-cols { height: auto; }
    ModelDetailScreen .detail-col { width: 1fr; height: auto; padding: 0 1 0 0; }
    ModelDetailScreen Sparkline { height: 2; }
    ModelDetailScreen #detail-events { height: 8; min-height: 4; border-top: solid $panel-lighten-2; }
    ModelDetailScreen #detail-action { height: auto; color: $text-muted; }
    /* narrow: the settings go under the runners, so no column of theirs is cut to "defaul…" */
    ModelDetailScreen.-narrow #detail-cols { layout: vertical; }
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model_name = name
        self.manifest_settings: dict[str, Any] | None = None
        self._events_shown = 0
        self.busy = False

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="detail-body"):
            yield Static("", id="detail-head")
            yield Static("", id="detail-action")
            with Horizontal(id="detail-cols"):
                with Vertical(classes="detail-col"):
                    yield Label("Runners", classes="section")
                    yield Static("", id="detail-runners")
                    yield Label("Memory", classes="section")
                    yield Static("", id="detail-memory")
                    yield Sparkline([], id="detail-mem-spark")
                    yield Label("Errors", classes="section")
                    yield Static("", id="detail-errors")
                with Vertical(classes="detail-col"):
                    yield Label("Settings in effect", classes="section")
                    yield Static("", id="detail-settings")
            yield Label("Recent events of this model", classes="section")
            yield RichLog(id="detail-events", wrap=True, markup=False, max_lines=200)

    def on_mount(self) -> None:
        super().on_mount()
        self.fetch_store()  # for where each setting came from (the manifest's [settings])
        self.redraw()

    def on_store_listed(self, message: StoreListed) -> None:
        entry = next((e for e in message.listing.get("store", []) if e["name"] == self.model_name), None)
        self.manifest_settings = dict((entry or {}).get("settings") or {})
        self.redraw()

    # --- drawing --------------------------------------------------------------------------

    def refresh_from(self, state: MonitorState) -> None:
        found = self.query("#detail-head")
        if not found:  # a late answer for a view being composed or already closed
            return
        row = state.model(self.model_name)
        head = found.first(Static)
        if row is None:
            head.update(Text(f"{self.model_name} is not loaded (any more). Escape goes back.", style="bold yellow"))
            return
        text = Text()
        text.append(row["name"], style="bold")
        shown = state.shown_state(row)
        text.append(f"  {shown}" + (" (daemon unreachable)" if state.stale else ""), style=STATE_STYLE.get(shown, ""))
        if row["state"] == "loading":
            text.append(f" ({row.get('phase')})")
        width = max(40, head.content_region.width or self.app.size.width - 4)
        runs_part = f"  runs {runs_long(row)}, {row.get('format')}"
        rest = f"loaded {fmt_time(row.get('loaded_at') or time.time())}, restarts {row.get('restarts', 0)}"
        fits = text.cell_len + len(runs_part) + 2 + len(rest) <= width
        text.append(runs_part + (", " if fits else "\n") + rest + "\n")  # a new line rather than a wrap mid-phrase
        if is_generation(row):  # token streams: no batcher figures, the engine's own instead
            text.append(generation_line(row, width=width))
        else:
            lat = row.get("latency_ms") or {}
            text.append(f"req/s {fmt_rate(row.get('requests_per_s'))}  p50 {fmt_ms(lat.get('p50'))} ms  p99 {fmt_ms(lat.get('p99'))} ms  "
                        f"queue {row.get('queue_depth', 0)}  avg batch {row.get('avg_batch_size') or 0:.1f} rows")
        if row.get("error"):
            text.append(f"\n{row['error']}", style="red")
        head.update(text)
        self._runners(row)
        self._memory(state, row)
        self._errors(row)
        self._settings(row)
        self._events(state)

    def _runners(self, row: dict[str, Any]) -> None:
        table = Table(box=None, pad_edge=False, show_edge=False)
        for header in ("#", "pid", "state", "batches", "backend s"):
            table.add_column(header)
        for runner in row.get("runners") or []:
            alive = runner.get("alive")
            table.add_row(str(runner.get("instance")), str(runner.get("pid") or "-"),
                          Text("alive" if alive else "down", style="green" if alive else "bold red"),
                          str(runner.get("batches", 0)), f"{runner.get('backend_s', 0.0):.2f}")
        self.query_one("#detail-runners", Static).update(table if row.get("runners") else Text("no runner processes", style="dim"))

    def _memory(self, state: MonitorState, row: dict[str, Any]) -> None:
        memory = row.get("memory") if isinstance(row.get("memory"), dict) else {}
        text = Text(f"{fmt_memory(row)}\n")
        error = memory.get("estimate_error")
        if error is not None:
            text.append(f"estimate error {error * 100:+.0f}%  ", style="yellow" if abs(error) > 0.25 else "")
        if memory.get("peak_bytes") is not None:
            text.append(f"peak {fmt_bytes(memory.get('peak_bytes'))}  ")
        if memory.get("ladder_step") not in (None, "none"):
            text.append(f"ladder: {memory['ladder_step']}", style="bold yellow")
        self.query_one("#detail-memory", Static).update(text)
        series = state.series.get(self.model_name)
        spark = self.query_one("#detail-mem-spark", Sparkline)
        spark.data = list(series.memory) if series is not None and series.memory else [0.0]
        limit = memory_limit(row)
        spark.tooltip = f"memory used over the last {len(spark.data)} samples" + (f" (limit {fmt_bytes(limit)})" if limit else "")

    def _errors(self, row: dict[str, Any]) -> None:
        failures, requests = row.get("failures", 0) or 0, row.get("requests", 0) or 0
        text = Text(f"{failures} failed of {requests} requests" + (f" ({100.0 * failures / requests:.1f}%)" if requests else ""),
                    style="bold red" if failures else "")
        last = row.get("last_error")
        if last:
            text.append(f"\nlast at {fmt_time(last['time'])}: ", style="dim")
            text.append(without_model_prefix(self.model_name, last.get("message", "")), style="red")
        self.query_one("#detail-errors", Static).update(text)

    def _settings(self, row: dict[str, Any]) -> None:
        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("setting", no_wrap=True)
        table.add_column("value", no_wrap=True)
        table.add_column("from", style="dim", no_wrap=True)
        for key, value, source in setting_sources(row.get("settings") or {}, row.get("overrides") or {}, self.manifest_settings):
            table.add_row(key, "-" if value is None else str(value), source)
        self.query_one("#detail-settings", Static).update(table)

    def _events(self, state: MonitorState) -> None:
        log = self.query_one("#detail-events", RichLog)
        events = state.model_events(self.model_name, limit=200)
        if len(events) < self._events_shown:
            self._events_shown = 0
            log.clear()
        for event in events[self._events_shown:]:
            log.write(event_line(event))
        self._events_shown = len(events)

    # --- actions --------------------------------------------------------------------------

    def action_tune(self) -> None:
        self.app.pop_screen()
        self.lm.open_on("tune", self.model_name)

    def action_unload(self) -> None:
        self._confirm("unload")

    def action_reload(self) -> None:
        self._confirm("reload")

    def _confirm(self, verb: str) -> None:
        if self.lm.writable(f"{verb} {self.model_name}"):
            self.app.push_screen(ConfirmScreen(STOPS_SERVING[verb].format(name=self.model_name), verb.capitalize()),
                                 lambda yes: yes and self.run_action(verb))

    @work(group="detail-action", exclusive=True, exit_on_error=False)
    async def run_action(self, action: str) -> None:
        if self.lm.read_only:
            return
        name = self.model_name
        row = self.lm.state.model(name) or {}
        self.query_one("#detail-action", Static).update(f"{action} {name} ...")
        started = time.monotonic()
        error = None
        try:
            await self.lm.client.unload(name)
            if action == "reload":
                await self.lm.client.load(name, dict(row.get("overrides") or {}))
        except ClientError as exc:
            error = exc.message if isinstance(exc, ApiError) else str(exc)
        self.post_message(LoadFinished(name, action, None, error, time.monotonic() - started))

    @on(LoadFinished)
    def _action_done(self, message: LoadFinished) -> None:
        box = self.query_one("#detail-action", Static)
        if message.error:
            box.update(Text(f"{message.action} failed: {without_model_prefix(message.name, message.error)}", style="red"))
            self.lm.report_error(message.error, model=message.name)
            return
        box.update(Text(f"{message.action} {message.name}: done in {message.seconds:.1f} s", style="green"))
        self.app.notify(escape(f"{message.name}: {message.action} done in {message.seconds:.1f} s"))
        if message.action == "unload":
            self.app.pop_screen()
