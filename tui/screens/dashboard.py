"""The dashboard: host and device gauges, the loaded models with their live figures,
throughput and latency history, and the newest events."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, RichLog, Sparkline

from lastmile.tui.screens.base import LastmileScreen
from lastmile.tui.state import MonitorState, fmt_bytes, fmt_ms, fmt_rate
from lastmile.tui.widgets.events_log import event_line
from lastmile.tui.widgets.gauge import Gauge
from lastmile.tui.widgets.models_table import COLUMNS, ModelsTable


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
        })
    return specs


class DashboardScreen(LastmileScreen):
    AUTO_FOCUS = "ModelsTable"
    BINDINGS = [
        Binding("s", "next_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def compose_body(self) -> ComposeResult:
        with Vertical(id="gauges"):
            yield Gauge("CPU", id="g-cpu")
            yield Gauge("RAM", id="g-ram")
            yield Vertical(id="g-memory")
            yield Vertical(id="g-devices")
        with Horizontal(id="table-bar"):
            yield Input(placeholder="filter models (/)", id="filter")
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
        self._update_sort_info()
        if self.lm.state.snapshot is not None:
            self.refresh_from(self.lm.state)

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
            devices.append({"id": acc["device"], "used": used, "total": total, "text": text, "budget": None, "low": None, "high": None})
        self._dynamic_gauges("#g-devices", "dev-", devices)

        table = self.query_one(ModelsTable)
        table.show(state.models)
        self._sparklines(state, table.selected)
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
            gauge.set(spec["used"], spec["total"], spec["text"], budget=spec["budget"], low=spec["low"], high=spec["high"])

    def _sparklines(self, state: MonitorState, selected: str | None) -> None:
        series = state.series.get(selected) if selected else None
        scope = selected if series is not None else "all models"
        rps = list(series.rps) if series is not None else list(state.total_rps)
        self.query_one("#s-rps", Sparkline).data = rps or [0.0]
        self.query_one("#l-rps", Label).update(f"throughput, {scope}: {fmt_rate(rps[-1] if rps else None)} req/s")
        if series is None and state.series:
            series = next(iter(state.series.values()))
            scope = next(iter(state.series))
        p50 = list(series.p50) if series is not None else []
        p99 = list(series.p99) if series is not None else []
        self.query_one("#s-p50", Sparkline).data = p50 or [0.0]
        self.query_one("#s-p99", Sparkline).data = p99 or [0.0]
        self.query_one("#l-p50", Label).update(f"p50, {scope if series is not None else '-'}: {fmt_ms(p50[-1] if p50 else None)} ms")
        self.query_one("#l-p99", Label).update(f"p99, {scope if series is not None else '-'}: {fmt_ms(p99[-1] if p99 else None)} ms")

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
        header = next(c[1] for c in COLUMNS if c[0] == table.sort_key)
        self.query_one("#sort-info", Label).update(f"sorted by {header} {'▼' if table.reverse else '▲'}  (s next, r reverse, or click a header)")

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

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            table = self.query_one(ModelsTable)
            table.filter = event.value
            table.show(self.lm.state.models)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.query_one(ModelsTable).focus()

    def on_data_table_header_selected(self) -> None:
        self._update_sort_info()

    def on_data_table_row_highlighted(self, event: ModelsTable.RowHighlighted) -> None:
        self._sparklines(self.lm.state, self.query_one(ModelsTable).selected)


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
