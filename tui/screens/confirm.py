"""A yes/no dialog for actions that interrupt serving (unload, reload, reloading tune)."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


#: What the models and detail screens ask before an action that stops a model serving.
STOPS_SERVING = {
    "unload": "Unload {name}? Requests to it will fail until it is loaded again.",
    "reload": "Reload {name} with its current settings? It stops serving while it restarts.",
}

#: The keys for those actions, the same on both screens (each screen asks with ``STOPS_SERVING``).
STOPS_SERVING_KEYS = [Binding("u", "unload", "Unload"), Binding("R", "reload", "Reload")]


class ConfirmScreen(ModalScreen[bool]):
    """Enter or ``y`` says yes, Escape or ``n`` says no, and the dialog says so under the
    question. The yes button has the focus, so Enter on arrival is yes; Tab to Cancel and
    Enter there is no."""

    BINDINGS = [Binding("y,enter", "answer(True)", "Yes", key_display="Enter/y"), Binding("n,escape", "answer(False)", "No", key_display="Esc/n")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen #dialog { width: 64; max-width: 100%; height: auto; padding: 1 2; border: thick $warning; background: $surface; }
    ConfirmScreen #question { width: 100%; margin: 0 0 1 0; }
    ConfirmScreen #dialog-buttons { height: 3; }
    ConfirmScreen #dialog-keys { width: 100%; margin: 1 0 0 0; color: $text-muted; }
    ConfirmScreen #dialog-buttons Button { margin: 0 2 0 0; }
    """

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(escape(self.question), id="question")
            with Horizontal(id="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes", action="screen.answer(True)")
                yield Button("Cancel", variant="primary", id="no", action="screen.answer(False)")
            yield Label(f"Enter or y: {escape(self.yes)}    Esc or n: Cancel", id="dialog-keys")

    def on_mount(self) -> None:
        self.query_one("#yes", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)
