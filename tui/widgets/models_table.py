"""The dashboard's table of loaded models: sortable by any column, filtered by a substring, and
fitted to the terminal: when the columns do not all fit, the least important ones are left
out (never cut), so an 80-column terminal still shows each model's name, state, load, errors
and memory in full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rich.text import Text
from textual.widgets import DataTable

from lastmile.tui.state import (STALE_STATE, fmt_ms, fmt_rate, generation_figures, is_generation, kv_text, memory_used,
                                model_memory_text, runs, runs_short)

STATE_STYLE = {"ready": "green", "loading": "yellow", "restarting": "yellow", "unloading": "dim", "failed": "bold red",
               STALE_STATE: "dim italic"}


def _lat(row: dict[str, Any], key: str) -> float | None:
    return (row.get("latency_ms") or {}).get(key)


def _errors(row: dict[str, Any]) -> Text:
    failures, requests = row.get("failures", 0) or 0, row.get("requests", 0) or 0
    if not failures:
        return Text("0", style="dim")
    return Text(f"{failures} ({100.0 * failures / requests:.0f}%)" if requests else str(failures), style="bold red")


def _state(row: dict[str, Any]) -> Text:
    return Text(row["state"] + ("" if row["state"] != "loading" else f" ({row.get('phase')})"), style=STATE_STYLE.get(row["state"], ""))


def _rate(row: dict[str, Any]) -> str:
    """Requests/s, or a generation model's tokens/s (its requests are long streams)."""
    if is_generation(row):
        return f"{fmt_rate(generation_figures(row)['tokens_per_s'])} tok/s"
    return f"{fmt_rate(row.get('requests_per_s'))} req/s"


def _rate_sort(row: dict[str, Any]) -> float:
    return float((generation_figures(row)["tokens_per_s"] if is_generation(row) else row.get("requests_per_s")) or 0.0)


def _latency(key: str) -> Callable[[dict[str, Any]], str]:
    """A request latency cell; for a generation model the inter-token figure, marked ``/tok``."""
    def cell(row: dict[str, Any]) -> str:
        if is_generation(row):
            value = generation_figures(row).get(f"itl_{key}_ms")
            return "-" if value is None else f"{fmt_ms(value)}/tok"
        return fmt_ms(_lat(row, key))
    return cell


def _latency_sort(key: str) -> Callable[[dict[str, Any]], float]:
    def value(row: dict[str, Any]) -> float:
        return float((generation_figures(row).get(f"itl_{key}_ms") if is_generation(row) else _lat(row, key)) or 0.0)
    return value


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def running_text(row: dict[str, Any]) -> str:
    """Sequences decoding, of the engine's slots: ``1/4``."""
    if not is_generation(row):
        return "-"
    g = generation_figures(row)
    return _count(g["running"]) + (f"/{g['max_num_seqs']}" if g["max_num_seqs"] else "")


def _ttft(row: dict[str, Any]) -> str:
    return fmt_ms(generation_figures(row)["ttft_p50_ms"]) if is_generation(row) else "-"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    cell: Callable[[dict[str, Any]], Any]
    sort: Callable[[dict[str, Any]], Any]
    priority: int  # 0 = always shown; higher numbers are left out first on a narrow terminal
    generation: bool = False  # only shown when a generation model is in the table


COLUMNS: list[Column] = [
    Column("name", "Model", lambda r: r["name"], lambda r: r["name"], 0),
    Column("state", "State", _state, lambda r: r["state"], 0),
    # what the runner reported it runs (engine and precision), not the backend asked for
    Column("runs", "Runs", runs_short, runs_short, 1),
    Column("device", "Device", lambda r: runs(r).get("device") or r.get("device") or "-", lambda r: runs(r).get("device") or "", 9),
    Column("rps", "Rate", _rate, _rate_sort, 0),
    Column("p50", "p50 ms", _latency("p50"), _latency_sort("p50"), 7),
    Column("p95", "p95 ms", lambda r: "-" if is_generation(r) else fmt_ms(_lat(r, "p95")), lambda r: _lat(r, "p95") or 0.0, 11),
    Column("p99", "p99 ms", _latency("p99"), _latency_sort("p99"), 2),
    Column("ttft", "TTFT ms", _ttft, lambda r: generation_figures(r)["ttft_p50_ms"] or 0.0, 3, generation=True),
    # a generation model's sequences decoding (of its slots) and waiting, and its KV cache
    Column("run", "Run", running_text, lambda r: generation_figures(r)["running"] or 0, 4, generation=True),
    Column("wait", "Wait", lambda r: _count(generation_figures(r)["waiting"]) if is_generation(r) else "-",
           lambda r: generation_figures(r)["waiting"] or 0, 4, generation=True),
    Column("kv", "KV used/resv", kv_text, lambda r: generation_figures(r)["kv_used_bytes"] or 0, 5, generation=True),
    Column("queue", "Queue", lambda r: str(r.get("queue_depth", 0)), lambda r: r.get("queue_depth", 0), 8),
    Column("batch", "Batch", lambda r: "-" if is_generation(r) else f"{r.get('avg_batch_size') or 0.0:.1f}",
           lambda r: r.get("avg_batch_size") or 0.0, 10),
    Column("requests", "Requests", lambda r: str(r.get("requests", 0)), lambda r: r.get("requests", 0), 7),
    Column("errors", "Errors", _errors, lambda r: (r.get("failures", 0) or 0, r.get("requests", 0) or 0), 0),
    # the shown figure is the sort key: what the cell says is what orders the rows
    Column("memory", "Memory", model_memory_text, lambda r: memory_used(r) or 0, 0),
]
SORT_KEYS = [c.key for c in COLUMNS]
CELL_PADDING = 2  # DataTable's cell_padding=1 on each side


def _width(value: Any) -> int:
    return Text(value).cell_len if isinstance(value, str) else value.cell_len if isinstance(value, Text) else len(str(value))


def choose_columns(columns: list[Column], rows: list[dict[str, Any]], width: int, sort_key: str = "") -> list[Column]:
    """The columns to show in ``width`` cells: every column when they fit, else the most
    important ones (by ``priority``) that do, in their usual order; a column is left out
    whole, never cut. A column's width is its widest cell or header (+2 for the sort arrow on
    the sorted one). Generation-only columns are left out when no row is a generation model."""
    any_generation = any(is_generation(r) for r in rows)
    candidates = [c for c in columns if any_generation or not c.generation]
    need = {c.key: max([_width(c.header) + (2 if c.key == sort_key else 0)] + [_width(c.cell(r)) for r in rows]) + CELL_PADDING
            for c in candidates}
    chosen: set[str] = set()
    used = 1  # the table's scrollbar gutter
    for column in sorted(candidates, key=lambda c: c.priority):
        if column.priority == 0 or used + need[column.key] <= width:
            chosen.add(column.key)
            used += need[column.key]
    return [c for c in candidates if c.key in chosen]


def fit_columns(rows: list[dict[str, Any]], width: int, sort_key: str = "") -> list[Column]:
    """:func:`choose_columns` of the dashboard's table."""
    return choose_columns(COLUMNS, rows, width, sort_key)


class ModelsTable(DataTable):
    """Rebuilt from each snapshot; the highlighted model stays highlighted."""

    DEFAULT_CSS = """
    ModelsTable {
        height: 1fr;
        min-height: 4;
    }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.sort_key = "requests"  # busiest first: the cursor starts on the model that matters
        self.reverse = True
        self.filter = ""
        self._rows: list[dict[str, Any]] = []
        self.shown_columns: list[Column] = []
        self.stale = False  # the daemon is unreachable: states show as unknown

    def on_resize(self) -> None:
        self.show(self._rows)

    def _set_columns(self, columns: list[Column]) -> None:
        if [c.key for c in columns] == [c.key for c in self.shown_columns]:
            return
        self.clear(columns=True)
        for column in columns:
            self.add_column(column.header, key=column.key)
        self.shown_columns = columns

    def _update_headers(self) -> None:
        for column in self.shown_columns:
            found = self.columns.get(column.key)  # type: ignore[call-overload]
            if found is not None:
                arrow = (" ▼" if self.reverse else " ▲") if column.key == self.sort_key else ""
                found.label = Text(column.header + arrow, style="bold" if arrow else "")

    @property
    def selected(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - no row under the cursor
            return None

    def visible_names(self) -> list[str]:
        return [str(k.value) for k in self.rows]

    def cell_text(self, name: str, key: str) -> str | None:
        """What the table shows for ``name`` in column ``key`` (None: column not shown)."""
        if key not in [c.key for c in self.shown_columns]:
            return None
        return str(self.get_cell(name, key))

    def show(self, rows: list[dict[str, Any]], *, stale: bool | None = None) -> None:
        """Draw ``rows``; ``stale`` (the daemon unreachable) shows every state as unknown."""
        if stale is not None:
            self.stale = stale
        if self.stale:
            rows = [{**r, "state": STALE_STATE} for r in rows]
        self._rows = rows
        selected = self.selected
        needle = self.filter.lower()
        shown = [
            r for r in rows
            if not needle or any(needle in str(v or "").lower() for v in (r.get("name"), r.get("state"), runs_short(r), r.get("device")))
        ]
        sort_value = next(c.sort for c in COLUMNS if c.key == self.sort_key)
        shown.sort(key=sort_value, reverse=self.reverse)
        width = self.size.width or (self.app.size.width if self.is_attached else 200)
        self._set_columns(fit_columns(rows, width, self.sort_key))
        self.clear()
        for row in shown:
            self.add_row(*(c.cell(row) for c in self.shown_columns), key=row["name"])
        if selected in self.visible_names():
            self.move_cursor(row=self.get_row_index(selected), animate=False)
        self._update_headers()

    def sort_by(self, key: str, reverse: bool | None = None) -> None:
        if key not in SORT_KEYS:
            raise ValueError(f"unknown column {key!r}")
        self.reverse = (not self.reverse if key == self.sort_key else False) if reverse is None else reverse
        self.sort_key = key
        self.show(self._rows)

    def next_sort(self) -> None:
        shown = [c.key for c in self.shown_columns] or SORT_KEYS
        position = shown.index(self.sort_key) if self.sort_key in shown else -1
        self.sort_by(shown[(position + 1) % len(shown)], reverse=self.reverse)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.sort_by(str(event.column_key.value))
