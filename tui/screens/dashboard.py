"""The dashboard: host and device gauges, the loaded models with their live figures,
throughput and latency history, and the newest events.

On a short terminal (under :data:`COMPACT_ROWS` rows) the charts give their lines to the
models table and the events pane shrinks, so 80x24 shows every demo model at once. Enter on a
row opens that model's detail view."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.events import Resize
from textual.widgets import DataTable, Input, Label, RichLog, Sparkline

from lastmile.tui.screens.base import LastmileScreen
from lastmile.tui.state import MonitorState, fmt_bytes, fmt_ms, fmt_rate, generation_figures
from lastmile.tui.widgets.events_log import event_line
from lastmile.tui.widgets.gauge import Gauge
from lastmile.tui.widgets.models_table import COLUMNS, ModelsTable

COMPACT_ROWS = 34  # below this many rows the charts are hidden and the events pane is 3 lines


def memory_gauges(memory: Any) -> list[dict[str, Any]]:
    """Gauge specs from the memory manager's ``memory`` figures, when the daemon reports them.

    Accepts ``{"host": {"used_bytes", "budget_bytes", "total_bytes"?, "low_watermark"?,
    "high_watermark"?}, "cuda:0": {...}, "low_watermark"?: f, "high_watermark"?: f}``;
    anything else shows as text.
    """
    if not isinstance(memory, dict):
        return []
    config = memory.get("config") if isinstance(memory.get("config"), dict) else memory
    low, high = config.get("low_watermark"), config.get("high_watermark")
    devices = memory.get("devices") if isinstance(memory.get("devices"), dict) else memory
    specs = []
    for name, entry in devices.items():
        if not isinstance(entry, dict) or "used_bytes" not in entry:
            continue
        budget = entry.get("budget_bytes") or entry.get("limit_bytes")
        total = entry.get("total_bytes") or budget
        used = entry.get("used_bytes") if entry.get("used_bytes") is not None else entry.get("committed_bytes")
        specs.append({
            "id": "mem " + name, "used": used, "total": total, "budget": budget,
            "low": entry.get("low_watermark", low), "high": entry.get("high_watermark", high),
            "text": f"{fmt_bytes(entry.get('used_bytes'))} used, {fmt_bytes(entry.get('committed_bytes'))} committed / budget {fmt_bytes(budget)}",
            "short": f"{fmt_bytes(entry.get('used_bytes'))} / {fmt_bytes(budget)}",
        })
    return specs


class DashboardScreen(LastmileScreen):
    AUTO_FOCUS = "ModelsTable"
    BINDINGS = [
        # priority: the table would take Enter for itself (and hide it from the footer)
        Binding("enter", "open_detail", "Detail", key_display="⏎", priority=True),
        Binding("s", "next_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]
    DEFAULT_CSS = """
    DashboardScreen #gauges { height: auto; padding: 0 1; }
    DashboardScreen #g-memory, DashboardScreen #g-devices { height: auto; }
    DashboardScreen #table-bar { height: 1; }
    DashboardScreen #filter { width: 32; height: 1; border: none; padding: 0 1; background: $boost; }
    DashboardScreen #sort-info { padding: 0 1; color: $text-muted; }
    DashboardScreen #sparks { height: 4; }
    DashboardScreen .spark { width: 1fr; padding: 0 1; }
    DashboardScreen .spark Sparkline { height: 2; }
    DashboardScreen #events { height: 7; border-top: solid $panel-lighten-2; }
    DashboardScreen.-compact #sparks { display: none; }
    DashboardScreen.-compact #events { height: 4; }
    """

    def compose_body(self) -> ComposeResult:
        with Vertical(id="gauges"):
            yield Gauge("CPU", id="g-cpu")
            yield Gauge("RAM", id="g-ram")
            yield Vertical(id="g-memory")
            yield Vertical(id="g-devices")
        with Horizontal(id="table-bar"):
            yield Input(placeholder="/ filter models", id="filter")
            yield Label("", id="sort-info")
        yield ModelsTable(id="models")
        with Horizontal(id="sparks"):
            with Vertical(classes="spark"):
                yield Label("throughput", id="l-rps")
                yield Sparkline([], id="s-rps")
            with Vertical(classes="spark"):
                yield Label("latency p50", id="l-p50")
                yield Sparkline([], id="s-p50")
            with Vertical(classes="spark"):
                yield Label("latency p99", id="l-p99")
                yield Sparkline([], id="s-p99")
        yield RichLog(id="events", max_lines=500, wrap=False, markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self._events_shown = 0
        self.set_class(self.app.size.height < COMPACT_ROWS, "-compact")
        self._update_sort_info()
        self.redraw()

    def on_resize(self, event: Resize) -> None:
        # (Textual also runs LastmileScreen.on_resize: handlers of every class in the MRO run)
        self.set_class(event.size.height < COMPACT_ROWS, "-compact")
        self._update_sort_info()

    # --- drawing --------------------------------------------------------------------------

    def refresh_from(self, state: MonitorState) -> None:
        snap = state.snapshot or {}
        host = snap.get("host") or {}
        self.query_one("#g-cpu", Gauge).set(host.get("cpu_percent"), 100.0, f"{host.get('cpu_percent', 0):.0f}% of {host.get('cpu_count', '?')} CPUs")
        self.query_one("#g-ram", Gauge).set(
            host.get("ram_used_bytes"), host.get("ram_total_bytes"),
            f"{fmt_bytes(host.get('ram_used_bytes'))} / {fmt_bytes(host.get('ram_total_bytes'))} (daemon {fmt_bytes(host.get('daemon_rss_bytes'))})",
        )
        self._dynamic_gauges("#g-memory", "mem-", memory_gauges(snap.get("memory")))
        devices = []
        for acc in snap.get("accelerators") or []:
            used, total = acc.get("memory_used_bytes"), acc.get("memory_total_bytes")
            util = acc.get("utilization_percent")
            text = f"{fmt_bytes(used)} / {fmt_bytes(total)}" + (f", util {util:.0f}%" if util is not None else "")
            devices.append({"id": acc["device"], "used": used, "total": total, "text": text, "budget": None, "low": None, "high": None, "short": None})
        self._dynamic_gauges("#g-devices", "dev-", devices)

        table = self.query_one(ModelsTable)
        table.show(state.models, stale=state.stale)
        self._sparklines(state)
        self._append_events(state)

    def _dynamic_gauges(self, container_id: str, prefix: str, specs: list[dict[str, Any]]) -> None:
        container = self.query_one(container_id, Vertical)
        wanted = {prefix + _safe_id(s["id"]): s for s in specs}
        for gauge in list(container.query(Gauge)):
            if gauge.id not in wanted:
                gauge.remove()
        for gid, spec in wanted.items():
            found = container.query(f"#{gid}")
            gauge = found.first(Gauge) if found else None
            if gauge is None:
                gauge = Gauge(spec["id"][:9], id=gid)
                container.mount(gauge)
            gauge.set(spec["used"], spec["total"], spec["text"], budget=spec["budget"], low=spec["low"], high=spec["high"], short_text=spec.get("short"))

    def _sparklines(self, state: MonitorState) -> None:
        """Throughput of all models together; latency of the model under the most load now
        (named in the label), not of whatever row the cursor rests on."""
        rps = list(state.total_rps)
        self.query_one("#s-rps", Sparkline).data = rps or [0.0]
        self.query_one("#l-rps", Label).update(f"throughput, all models: {fmt_rate(rps[-1] if rps else None)} req/s")
        busiest = state.busiest()
        series = state.series.get(busiest) if busiest else None
        scope = f"{busiest} (busiest)" if busiest else "-"
        if series is not None and series.generation:
            # a generation model has no request latency: its tokens/s and time to first token
            tokens, ttft = list(series.tokens), list(series.ttft)
            self.query_one("#s-p50", Sparkline).data = tokens or [0.0]
            self.query_one("#s-p99", Sparkline).data = ttft or [0.0]
            row = state.model(busiest) or {}
            figures = generation_figures(row)
            self.query_one("#l-p50", Label).update(f"tokens/s, {scope}: {fmt_rate(figures['tokens_per_s'])}")
            self.query_one("#l-p99", Label).update(f"TTFT p50, {scope}: {fmt_ms(figures['ttft_p50_ms'])} ms")
            return
        p50 = list(series.p50) if series is not None else []
        p99 = list(series.p99) if series is not None else []
        self.query_one("#s-p50", Sparkline).data = p50 or [0.0]
        self.query_one("#s-p99", Sparkline).data = p99 or [0.0]
        latency = (state.model(busiest) or {}).get("latency_ms") or {} if busiest else {}
        self.query_one("#l-p50", Label).update(f"p50, {scope}: {fmt_ms(latency.get('p50'))} ms")  # "-" before any request
        self.query_one("#l-p99", Label).update(f"p99, {scope}: {fmt_ms(latency.get('p99'))} ms")

    def _append_events(self, state: MonitorState) -> None:
        log = self.query_one("#events", RichLog)
        events = list(state.events)
        if self._events_shown > len(events):
            self._events_shown = 0  # the buffer wrapped: redraw from what is kept
            log.clear()
        for event in events[self._events_shown:]:
            log.write(event_line(event))
        self._events_shown = len(events)

    def _update_sort_info(self) -> None:
        table = self.query_one(ModelsTable)
        header = next(c.header for c in COLUMNS if c.key == table.sort_key)
        hint = "  (s next, r reverse, Enter detail)" if self.app.size.width >= 100 else ""
        self.query_one("#sort-info", Label).update(f"sorted by {header} {'▼' if table.reverse else '▲'}{hint}")

    # --- actions --------------------------------------------------------------------------

    def action_next_sort(self) -> None:
        self.query_one(ModelsTable).next_sort()
        self._update_sort_info()

    def action_reverse_sort(self) -> None:
        table = self.query_one(ModelsTable)
        table.sort_by(table.sort_key, reverse=not table.reverse)
        self._update_sort_info()

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        self.query_one(ModelsTable).focus()

    def action_open_detail(self) -> None:
        if isinstance(self.focused, Input):  # Enter in the filter box: done filtering
            self.query_one(ModelsTable).focus()
            return
        name = self.query_one(ModelsTable).selected
        if name is None:
            self.app.notify("no model selected: load one on the Models screen (m)", severity="warning")
            return
        self.lm.open_detail(name)

    @on(DataTable.RowSelected, "#models")
    def _row_chosen(self) -> None:
        """Enter (or a click) on a row: DataTable consumes Enter itself and says so with this."""
        self.action_open_detail()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        table = self.query_one(ModelsTable)
        table.filter = event.value
        table.show(self.lm.state.models, stale=self.lm.state.stale)

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one(ModelsTable).focus()

    def on_data_table_header_selected(self) -> None:
        self._update_sort_info()


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
