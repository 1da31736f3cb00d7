"""A footer that keeps the keys an operator needs on a small terminal.

Textual's footer lays the keys out in binding order (focused widget, screen, app) and cuts
what does not fit on the right, which on 80 columns loses ``? Help`` and ``q Quit``, the two
keys a stranger needs most. This one drops keys by importance instead (the refresh-rate and
pause keys first, then the screen switches) until the rest fit, and always shows Help and
Quit, at the right end where people look for them.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

ALWAYS = ("help", "quit")
# left out first .. last when the width runs short (actions of the app's bindings)
DROP_ORDER = ("faster", "slower", "toggle_pause", "switch_mode('events')", "switch_mode('playground')",
              "switch_mode('tune')", "switch_mode('models')", "switch_mode('dashboard')")


def key_width(display: str, description: str) -> int:
    """Cells a compact footer key takes: ``key`` space ``description`` and one space each side."""
    return len(display) + 1 + len(description) + 2


class KeysFooter(Footer):
    def __init__(self) -> None:
        super().__init__(compact=True, show_command_palette=False)

    def on_resize(self) -> None:
        self.refresh(recompose=True)

    def chosen(self, width: int) -> list[tuple[Binding, bool, str]]:
        """The bindings to show in ``width`` cells, in display order (Help and Quit last)."""
        seen: dict[str, tuple[Binding, bool, str]] = {}
        for _, binding, enabled, tooltip in self.screen.active_bindings.values():
            if binding.show and binding.action not in seen:
                seen[binding.action] = (binding, enabled, tooltip)
        pinned = [seen[a] for a in ALWAYS if a in seen]
        rest = [v for a, v in seen.items() if a not in ALWAYS]

        def cost(items: list[tuple[Binding, bool, str]]) -> int:
            return sum(key_width(self.app.get_key_display(b), b.description) for b, _, _ in items)

        for action in DROP_ORDER:
            if cost(rest) + cost(pinned) <= width:
                break
            rest = [v for v in rest if v[0].action != action]
        while rest and cost(rest) + cost(pinned) > width:
            rest.pop()  # still too wide: the screen's last keys go (they are in its help, `?`)
        return rest + pinned

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        items = self.chosen(self.size.width or self.app.size.width)
        self.styles.grid_size_columns = len(items)
        for binding, enabled, tooltip in items:
            yield FooterKey(binding.key, self.app.get_key_display(binding), binding.description, binding.action,
                            disabled=not enabled, tooltip=tooltip).data_bind(compact=Footer.compact)
