"""The models screen: the store (what can be loaded), what is loaded, and the load form with
progress; unload and reload ask first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Select, Static

from lastmile.appliance.client.api import ApiError, ClientError
from lastmile.appliance.client.wording import without_model_prefix
from lastmile.tui.forms import BACKENDS, DTYPES, GRAPH_FUSION, PHASES, FormError, describe_estimate, load_parameters, phase_progress
from lastmile.tui.messages import EstimateReady, LoadFinished, LoadProgress, StoreListed
from lastmile.tui.screens.base import LastmileScreen
from lastmile.tui.screens.confirm import STOPS_SERVING, STOPS_SERVING_KEYS, ConfirmScreen
from lastmile.tui.state import STALE_STATE, MonitorState, runs, runs_short
from lastmile.tui.widgets.fitted_table import FittedTable
from lastmile.tui.widgets.models_table import STATE_STYLE, Column


def _inputs(entry: dict[str, Any]) -> str:
    """``input_ids INT64[-1,-1], attention_mask INT64[-1,-1]``."""
    return ", ".join(f"{t['name']} {t['datatype']}[{','.join(str(d) for d in t['shape'])}]" for t in entry.get("inputs", [])) or "-"


def _setting(key: str, unset: str = "-") -> Any:
    return lambda r: str((r.get("settings") or {}).get(key) if (r.get("settings") or {}).get(key) is not None else unset)


# The store and loaded tables: a column that does not fit is left out (lowest priority first), never cut.
STORE_COLUMNS = [
    Column("name", "Model", lambda e: e["name"], lambda e: e["name"], 0),
    Column("format", "Format", lambda e: e.get("format") or "?", lambda e: e.get("format") or "", 3),
    Column("backend", "Backend", lambda e: e.get("backend") or "?", lambda e: e.get("backend") or "", 4),
    Column("loaded", "Loaded", lambda e: Text("yes", style="green") if e.get("loaded") else Text("no", style="dim"), lambda e: bool(e.get("loaded")), 1),
    Column("inputs", "Inputs", _inputs, _inputs, 2),
    Column("description", "Description", lambda e: e.get("error") or e.get("description") or "", lambda e: e.get("description") or "", 5),
]
LOADED_COLUMNS = [
    Column("name", "Model", lambda r: r["name"], lambda r: r["name"], 0),
    Column("state", "State", lambda r: Text(r["state"], style=STATE_STYLE.get(r["state"], "")), lambda r: r["state"], 0),
    Column("phase", "Phase", lambda r: r.get("phase") or "-", lambda r: r.get("phase") or "", 6),
    # what the runner reported it runs (engine, precision), not the backend and dtype asked for
    Column("runs", "Runs", runs_short, runs_short, 1),
    Column("device", "Device", lambda r: runs(r).get("device") or r.get("device") or "-", lambda r: r.get("device") or "", 3),
    Column("fusion", "Fusion", _setting("graph_fusion"), _setting("graph_fusion"), 5),
    Column("batch", "Batch", _setting("max_batch_size"), _setting("max_batch_size"), 4),
    Column("limit", "Limit MiB", _setting("memory_limit_mb"), _setting("memory_limit_mb"), 2),
]

ESTIMATE_TEXT = "estimate: pick a model; the daemon's dry run (POST /lm/v1/memory/estimate) says what it needs and whether it fits."
ESTIMATE_DEBOUNCE_S = 0.4
PHASE_POLL_S = 0.1


def _choices(values: tuple[str, ...], first: str = "default") -> list[tuple[str, str]]:
    return [(first, first)] + [(v, v) for v in values if v != first]


class ModelsScreen(LastmileScreen):
    BINDINGS = [Binding("l", "load", "Load"), *STOPS_SERVING_KEYS, Binding("g", "refresh_store", "Refresh")]
    MUTATING_ACTIONS = ("load", "unload", "reload")
    DEFAULT_CSS = """
    ModelsScreen #models-body { height: 1fr; }
    ModelsScreen #models-tables { height: auto; max-height: 14; }
    ModelsScreen .half { width: 1fr; height: auto; padding: 0 1; }
    ModelsScreen .half DataTable { height: auto; max-height: 12; }
    ModelsScreen #load-form { height: auto; padding: 0 1; border-top: solid $panel-lighten-2; }
    ModelsScreen #estimate { color: $text-muted; padding: 0 1; }
    ModelsScreen #load-status { height: 2; }
    ModelsScreen #load-phase { padding: 0 1; width: auto; }
    ModelsScreen.-narrow #models-tables { layout: vertical; max-height: 24; }
    ModelsScreen.-narrow .half DataTable { max-height: 8; }
    """

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="models-body", can_focus=False):  # Tab goes to the store table, not the scroller
            with Horizontal(id="models-tables"):
                with Vertical(classes="half"):
                    yield Label("Store: what can be loaded", classes="section")
                    yield FittedTable(STORE_COLUMNS, id="store")
                with Vertical(classes="half"):
                    yield Label("Loaded", classes="section")
                    yield FittedTable(LOADED_COLUMNS, id="loaded")
            with Vertical(id="load-form", classes="mutating"):
                yield Label("Load a model", classes="section")
                with Grid(id="form-grid"):
                    yield Label("model")
                    yield Select([], id="f-model", prompt="pick a model from the store")
                    yield Label("backend")
                    yield Select([(b, b) for b in BACKENDS], value="auto", allow_blank=False, id="f-backend")
                    yield Label("device")
                    yield Select(_choices(("auto", "cpu")), value="default", allow_blank=False, id="f-device")
                    yield Label("dtype")
                    yield Select(_choices(DTYPES), value="default", allow_blank=False, id="f-dtype")
                    yield Label("graph fusion")
                    yield Select(_choices(GRAPH_FUSION), value="default", allow_blank=False, id="f-graph_fusion")
                    yield Label("memory limit MiB")
                    yield Input(placeholder="none", id="f-memory_limit_mb", type="integer")
                    yield Label("max batch size")
                    yield Input(placeholder="default", id="f-max_batch_size", type="integer")
                    yield Label("max delay ms")
                    yield Input(placeholder="default", id="f-max_delay_ms", type="number")
                    yield Label("max queue")
                    yield Input(placeholder="default", id="f-max_queue", type="integer")
                yield Static(ESTIMATE_TEXT, id="estimate")
                with Horizontal(id="load-buttons"):
                    yield Button("Load", variant="success", id="b-load", action="screen.load")
                    yield Button("Unload", variant="error", id="b-unload", action="screen.unload")
                    yield Button("Reload", variant="warning", id="b-reload", action="screen.reload")
                with Horizontal(id="load-status"):
                    yield Label("", id="load-phase")
                    yield ProgressBar(total=len(PHASES) - 1, show_eta=False, id="load-progress")

    def on_mount(self) -> None:
        super().on_mount()
        self.store: list[dict[str, Any]] = []
        self.busy: str | None = None
        self.last_estimate: dict[str, Any] | None = None
        self._loaded_names: tuple[str, ...] | None = None
        self.query_one("#load-progress", ProgressBar).display = False
        self.fetch_store()
        self.fetch_devices()
        self.redraw()

    # --- data -----------------------------------------------------------------------------

    def store_unavailable(self, exc: ClientError) -> None:
        self.lm.report_error(f"cannot list models: {exc}")  # this screen is the store: say why it is empty

    @work(group="devices", exclusive=True, exit_on_error=False)
    async def fetch_devices(self) -> None:
        try:
            facts = await self.lm.client.system()
        except ClientError:
            return  # the device list stays auto/cpu; the banner covers a dead daemon
        devices = (facts.get("accelerators") or {}).get("devices") or []
        options = _choices(tuple(["auto", "cpu", *[d for d in devices if d != "cpu"]]))
        select = self.query_one("#f-device", Select)
        value = select.value
        select.set_options(options)
        select.value = value if any(v == value for _, v in options) else "default"

    def on_store_listed(self, message: StoreListed) -> None:
        self.store = message.listing.get("store", [])
        self.query_one("#store", FittedTable).show(self.store)
        select = self.query_one("#f-model", Select)
        current = select.value
        select.set_options([(e["name"], e["name"]) for e in self.store if not e.get("error")])
        if isinstance(current, str) and any(e["name"] == current for e in self.store):
            select.value = current
        if getattr(self, "_pending", None):
            self.select_model(self._pending)
        self._show_loaded(message.listing.get("loaded", []))

    def refresh_from(self, state: MonitorState) -> None:
        self._show_loaded(state.models, stale=state.stale)
        names = tuple(sorted(r["name"] for r in state.models))
        if self._loaded_names is not None and names != self._loaded_names:
            self.fetch_store()  # something was loaded or unloaded elsewhere: the "loaded" column changed
        self._loaded_names = names

    def _show_loaded(self, rows: list[dict[str, Any]], *, stale: bool = False) -> None:
        self.query_one("#loaded", FittedTable).show([{**r, "state": STALE_STATE} for r in rows] if stale else rows)

    def _selected(self, table_id: str) -> str | None:
        table = self.query_one(table_id, DataTable)
        if not table.row_count:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:  # noqa: BLE001 - no row under the cursor
            return None

    def select_model(self, name: str) -> None:
        """Put ``name`` in the load form (from the store table or the command palette)."""
        select = self.query_one("#f-model", Select)
        if any(e["name"] == name for e in self.store):
            select.value = name
            self._prefill(name)
            self._pending = None
            self.query_one("#load-form").scroll_visible(animate=False)
        else:
            self._pending = name  # the store listing is still on its way

    def _prefill(self, name: str) -> None:
        entry = next((e for e in self.store if e["name"] == name), None)
        settings = (entry or {}).get("settings") or {}
        for key in ("memory_limit_mb", "max_batch_size", "max_delay_ms", "max_queue"):
            box = self.query_one(f"#f-{key}", Input)
            box.placeholder = f"manifest: {settings[key]}" if key in settings else ("none" if key == "memory_limit_mb" else "default")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # only the operator's own moves pick a model; a table rebuilt by a refresh does not
        if event.data_table.id == "store" and event.data_table.has_focus and event.row_key is not None and not self.lm.read_only:
            self.select_model(str(event.row_key.value))

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "f-model" and isinstance(event.value, str):
            self._prefill(event.value)
        if (event.select.id or "").startswith("f-"):
            self.schedule_estimate()

    def on_input_changed(self, event: Input.Changed) -> None:
        if (event.input.id or "").startswith("f-"):
            self.schedule_estimate()

    # --- the memory estimate (the daemon's dry run) -----------------------------------------

    def schedule_estimate(self) -> None:
        """Ask again once the operator stops typing (one request, not one per key)."""
        timer = getattr(self, "_estimate_timer", None)
        if timer is not None:
            timer.stop()
        self._estimate_timer = self.set_timer(ESTIMATE_DEBOUNCE_S, self.request_estimate)

    def request_estimate(self) -> None:
        if self.lm.read_only:
            return
        name = self.query_one("#f-model", Select).value
        if not isinstance(name, str):
            return
        try:
            params = load_parameters(self.form_values())
        except FormError as exc:
            self.query_one("#estimate", Static).update(Text(f"estimate: fix {exc.field} first ({exc.message})", style="yellow"))
            return
        self.fetch_estimate(name, params)

    @work(group="estimate", exclusive=True, exit_on_error=False)
    async def fetch_estimate(self, name: str, params: dict[str, Any]) -> None:
        try:
            data = await self.lm.client.request("POST", "/lm/v1/memory/estimate", {"model": name, "parameters": params})
        except ApiError as exc:
            error = "not available from this daemon (no /lm/v1/memory/estimate)" if exc.status == 404 and "endpoint" in exc.message else exc.message
            self.post_message(EstimateReady(name, None, error))
            return
        except ClientError as exc:
            self.post_message(EstimateReady(name, None, str(exc)))
            return
        self.post_message(EstimateReady(name, data, None))

    def on_estimate_ready(self, message: EstimateReady) -> None:
        self.last_estimate = message.data
        box = self.query_one("#estimate", Static)
        if message.data is None:
            box.update(Text(f"estimate for {message.name}: {message.error}", style="yellow"))
        else:
            box.update(Text(f"{message.name}: " + describe_estimate(message.data), style="green" if message.data.get("fits") else "bold red"))

    # --- load / unload / reload -------------------------------------------------------------

    def form_values(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for key in ("backend", "device", "dtype", "graph_fusion"):
            value = self.query_one(f"#f-{key}", Select).value
            values[key] = value if isinstance(value, str) else ""
        for key in ("memory_limit_mb", "max_batch_size", "max_delay_ms", "max_queue"):
            values[key] = self.query_one(f"#f-{key}", Input).value
        return values

    def action_load(self) -> None:
        if not self.lm.writable("load a model"):
            return
        name = self.query_one("#f-model", Select).value
        if not isinstance(name, str):
            self.lm.report_error("pick a model to load first (Enter on a row of the store table, or the form's model field)")
            self.query_one("#f-model", Select).focus()
            self.query_one("#load-form").scroll_visible(animate=False)
            return
        try:
            params = load_parameters(self.form_values())
        except FormError as exc:
            self.lm.report_error(f"{exc.field}: {exc.message}")
            self.query_one(f"#f-{exc.field}").focus()
            return
        if self.lm.state.model(name) is not None:
            self.app.push_screen(
                ConfirmScreen(f"{name} is loaded. Loading it with these settings reloads it (a pause in serving). Go on?", "Reload"),
                lambda yes: yes and self._start("load", name, params),
            )
            return
        self._start("load", name, params)

    def _target(self) -> str | None:
        name = self._selected("#loaded")
        if name is None:
            self.lm.report_error("select a loaded model in the 'Loaded' table first")
        return name

    def action_unload(self) -> None:
        self._on_selected("unload")

    def action_reload(self) -> None:
        self._on_selected("reload")

    def _on_selected(self, verb: str) -> None:
        if self.lm.writable(f"{verb} a model") and (name := self._target()) is not None:
            self.confirm(verb, name)

    def confirm(self, verb: str, name: str) -> None:
        """Ask, then unload or reload ``name`` (a reload keeps the settings changed live)."""
        if not self.lm.writable(f"{verb} {name}"):
            return
        params = dict((self.lm.state.model(name) or {}).get("overrides") or {}) if verb == "reload" else {}
        self.app.push_screen(ConfirmScreen(STOPS_SERVING[verb].format(name=name), verb.capitalize()),
                             lambda yes: yes and self._start(verb, name, params))

    def action_refresh_store(self) -> None:
        self.fetch_store()

    @on(DataTable.RowSelected, "#store")
    def _store_row_chosen(self, event: DataTable.RowSelected) -> None:
        """Enter on a store row: that model in the form, the form in view, focus on Load."""
        if self.lm.read_only or event.row_key is None:
            return
        self.select_model(str(event.row_key.value))
        self.query_one("#b-load", Button).focus()
        self.query_one("#load-buttons").scroll_visible(animate=False)

    def _start(self, action: str, name: str, params: dict[str, Any]) -> None:
        if not self.lm.writable(f"{action} {name}"):  # every path to the daemon passes here
            return
        if self.busy:
            self.lm.report_error(f"wait: {self.busy} is still running")
            return
        self.busy = f"{action} {name}"
        for button in self.query("#load-buttons Button"):
            button.disabled = True
        bar = self.query_one("#load-progress", ProgressBar)
        bar.display = action != "unload"
        bar.update(progress=0)
        self.query_one("#load-phase", Label).update(f"{action} {name}: starting")
        self.query_one("#load-status").scroll_visible(animate=False)
        self.run_action(action, name, params)

    @work(group="load", exclusive=False, exit_on_error=False)
    async def run_action(self, action: str, name: str, params: dict[str, Any]) -> None:
        """The daemon call in a worker; a second task polls the load's phase meanwhile."""
        client = self.lm.client
        started = time.monotonic()
        poller = asyncio.get_running_loop().create_task(self._poll_phase(name)) if action != "unload" else None
        row: dict[str, Any] | None = None
        error: str | None = None
        try:
            if action in ("unload", "reload"):
                await client.unload(name)
            if action in ("load", "reload"):
                row = await client.load(name, params)
        except ClientError as exc:
            error = exc.message if isinstance(exc, ApiError) else str(exc)
        finally:
            if poller is not None:
                poller.cancel()
        self.post_message(LoadFinished(name, action, row, error, time.monotonic() - started))

    async def _poll_phase(self, name: str) -> None:
        last = None
        while True:
            try:
                row = await self.lm.client.model(name)
                phase, state = row.get("phase") or "queued", row.get("state")
            except ApiError as exc:
                if exc.status != 404:
                    return
                phase, state = "queued", None  # not registered yet (or torn down for a reload)
            except ClientError:
                return
            if (phase, state) != last:
                last = (phase, state)
                self.post_message(LoadProgress(name, phase, state))
            await asyncio.sleep(PHASE_POLL_S)

    def on_load_progress(self, message: LoadProgress) -> None:
        if not self.busy or not self.busy.endswith(" " + message.name):
            return
        step = phase_progress(message.phase)
        self.query_one("#load-progress", ProgressBar).update(progress=step)
        self.query_one("#load-phase", Label).update(f"{self.busy}: {message.phase} ({step}/{len(PHASES) - 1})")
        self.phases_seen.append(message.phase)

    @property
    def phases_seen(self) -> list[str]:
        if not hasattr(self, "_phases_seen"):
            self._phases_seen: list[str] = []
        return self._phases_seen

    def on_load_finished(self, message: LoadFinished) -> None:
        self.busy = None
        for button in self.query("#load-buttons Button"):
            button.disabled = False
        label = self.query_one("#load-phase", Label)
        label.scroll_visible(animate=False)  # the result where the eye is, even on a short terminal
        if message.error:
            label.update(Text(f"{message.action} {message.name} failed: {without_model_prefix(message.name, message.error)}", style="red"))
            self.lm.report_error(message.error, model=message.name)
        else:
            if message.row is not None:
                self.query_one("#load-progress", ProgressBar).update(progress=len(PHASES) - 1)
            label.update(Text(f"{message.action} {message.name}: done in {message.seconds:.1f} s", style="green"))
            self.app.notify(escape(f"{message.name}: {message.action} done in {message.seconds:.1f} s"))
        self.fetch_store()
