"""The help screen: every key binding, by screen, and what read-only mode hides."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


NAMES = {"slash": "/", "question_mark": "?", "plus": "+", "equals_sign": "=", "minus": "-"}


def _key(binding: Binding) -> str:
    """Every key of a binding (``d, f2``), not only the one the footer shows."""
    return ", ".join(NAMES.get(k.strip(), k.strip()) for k in binding.key.split(","))


def bindings_table(sections: list[tuple[str, list[Binding]]], read_only: bool) -> Table:
    table = Table(title="Lastmile TUI: keys", expand=True, show_lines=False)
    table.add_column("where", style="cyan", no_wrap=True)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("what")
    for where, bindings in sections:
        for binding in bindings:
            if isinstance(binding, tuple):
                binding = Binding(*binding)
            table.add_row(where, _key(binding), binding.description or binding.action)
    table.add_row("anywhere", "ctrl+p", "command palette: screens, rates, load/unload/tune a model by name")
    if read_only:
        table.caption = "READ-ONLY: load, unload, reload and tune are hidden and refused."
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss_help", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen #help-box { width: 90%; height: 90%; border: thick $accent; background: $surface; padding: 0 1; }
    """

    def __init__(self, sections: list[tuple[str, list[Binding]]], read_only: bool) -> None:
        super().__init__()
        self.sections, self.read_only = sections, read_only

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(bindings_table(self.sections, self.read_only), id="help-table")
            yield Static("escape closes this help.", id="help-foot")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
