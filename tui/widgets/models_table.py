"""The dashboard's table of loaded models: sortable by any column, filtered by a substring."""

from __future__ import annotations

from typing import Any, Callable

from rich.text import Text
from textual.widgets import DataTable

from lastmile.tui.state import fmt_memory, fmt_ms, fmt_rate

STATE_STYLE = {"ready": "green", "loading": "yellow", "restarting": "yellow", "unloading": "dim", "failed": "bold red"}


def _lat(row: dict[str, Any], key: str) -> float | None:
    return (row.get("latency_ms") or {}).get(key)


# key, header, cell text, sort value
COLUMNS: list[tuple[str, str, Callable[[dict], Any], Callable[[dict], Any]]] = [
    ("name", "Model", lambda r: r["name"], lambda r: r["name"]),
    ("state", "State", lambda r: Text(r["state"] + ("" if r["state"] != "loading" else f" ({r.get('phase')})"), style=STATE_STYLE.get(r["state"], "")), lambda r: r["state"]),
    ("backend", "Backend", lambda r: r.get("backend") or "-", lambda r: r.get("backend") or ""),
    ("device", "Device", lambda r: r.get("device") or "-", lambda r: r.get("device") or ""),
    ("rps", "Req/s", lambda r: fmt_rate(r.get("requests_per_s")), lambda r: r.get("requests_per_s") or 0.0),
    ("p50", "p50 ms", lambda r: fmt_ms(_lat(r, "p50")), lambda r: _lat(r, "p50") or 0.0),
    ("p95", "p95 ms", lambda r: fmt_ms(_lat(r, "p95")), lambda r: _lat(r, "p95") or 0.0),
    ("p99", "p99 ms", lambda r: fmt_ms(_lat(r, "p99")), lambda r: _lat(r, "p99") or 0.0),
    ("queue", "Queue", lambda r: str(r.get("queue_depth", 0)), lambda r: r.get("queue_depth", 0)),
    ("batch", "Avg batch", lambda r: f"{r.get('avg_batch_size') or 0.0:.2f}", lambda r: r.get("avg_batch_size") or 0.0),
    ("requests", "Requests", lambda r: str(r.get("requests", 0)), lambda r: r.get("requests", 0)),
    ("memory", "Memory", fmt_memory, lambda r: r.get("rss_bytes") or 0),
]
SORT_KEYS = [c[0] for c in COLUMNS]


class ModelsTable(DataTable):
    """Rebuilt from each snapshot; the highlighted model stays highlighted."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.sort_key = "requests"  # busiest first: the cursor starts on the model that matters
        self.reverse = True
        self.filter = ""
        self._rows: list[dict[str, Any]] = []

    def on_mount(self) -> None:
        for key, header, _, _ in COLUMNS:
            self.add_column(header, key=key)
        self._update_headers()

    def _update_headers(self) -> None:
        for key, header, _, _ in COLUMNS:
            column = self.columns.get(key)  # type: ignore[call-overload]
            if column is not None:
                arrow = (" ▼" if self.reverse else " ▲") if key == self.sort_key else ""
                column.label = Text(header + arrow, style="bold" if arrow else "")

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

    def show(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows
        selected = self.selected
        needle = self.filter.lower()
        shown = [
            r for r in rows
            if not needle or any(needle in str(r.get(k) or "").lower() for k in ("name", "state", "backend", "device"))
        ]
        sort_value = next(c[3] for c in COLUMNS if c[0] == self.sort_key)
        shown.sort(key=sort_value, reverse=self.reverse)
        self.clear()
        for row in shown:
            self.add_row(*(c[2](row) for c in COLUMNS), key=row["name"])
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
        self.sort_by(SORT_KEYS[(SORT_KEYS.index(self.sort_key) + 1) % len(SORT_KEYS)], reverse=self.reverse)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.sort_by(str(event.column_key.value))
