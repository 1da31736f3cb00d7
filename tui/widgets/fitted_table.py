"""A DataTable that fits its width by leaving columns out, never by cutting them: the models
screen's store and loaded tables (the dashboard's :class:`ModelsTable` does the same with its
own sorting and filtering). Which columns go first is each column's ``priority``."""

from __future__ import annotations

from typing import Any, Callable

from textual.widgets import DataTable

from lastmile.tui.widgets.models_table import Column, choose_columns


class FittedTable(DataTable):
    def __init__(self, columns: list[Column], key: Callable[[dict[str, Any]], str] = lambda r: r["name"], **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.all_columns = columns
        self.key = key
        self.rows_shown: list[dict[str, Any]] = []
        self.shown_columns: list[Column] = []

    def on_resize(self) -> None:
        self.show(self.rows_shown)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        except Exception:  # noqa: BLE001 - no row under the cursor
            return None

    def cell_text(self, key: str, column: str) -> str | None:
        """What the table shows for row ``key`` in ``column`` (None: column left out)."""
        if column not in [c.key for c in self.shown_columns]:
            return None
        return str(self.get_cell(key, column))

    def show(self, rows: list[dict[str, Any]]) -> None:
        self.rows_shown = rows
        selected = self.selected_key()
        width = self.size.width or (self.parent.size.width if self.parent is not None and self.parent.size.width else 80)
        columns = choose_columns(self.all_columns, rows, width)
        if [c.key for c in columns] != [c.key for c in self.shown_columns]:
            self.clear(columns=True)
            for column in columns:
                self.add_column(column.header, key=column.key)
            self.shown_columns = columns
        else:
            self.clear()
        for row in rows:
            self.add_row(*(c.cell(row) for c in columns), key=self.key(row))
        if selected is not None and selected in [str(k.value) for k in self.rows]:
            self.move_cursor(row=self.get_row_index(selected), animate=False)
