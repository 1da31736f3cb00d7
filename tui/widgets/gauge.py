"""A one-line gauge: label, bar, figures; optional budget and watermark marks on the bar."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


LEGEND = "┊low ┃high ▕budget"


class Gauge(Static):
    """``used`` of ``total`` as a bar. ``budget`` (same unit) draws a ``▕`` where the budget
    ends; ``low``/``high`` are watermark fractions *of the budget* (or of ``total`` when there
    is no budget), drawn as ``┊`` (low, yellow) and ``┃`` (high, red). A gauge with marks says
    what they are (:data:`LEGEND`) after its figures, as far as the width allows."""

    DEFAULT_CSS = """
    Gauge {
        height: 1;
    }
    """

    def __init__(self, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.used: float | None = None
        self.total: float | None = None
        self.text = "-"
        self.short_text: str | None = None  # said instead of text when the full one leaves the bar too narrow
        self.budget: float | None = None
        self.low: float | None = None
        self.high: float | None = None

    def set(self, used: float | None, total: float | None, text: str, *, budget: float | None = None, low: float | None = None,
            high: float | None = None, short_text: str | None = None) -> None:
        self.used, self.total, self.text, self.budget, self.low, self.high = used, total, text, budget, low, high
        self.short_text = short_text
        self.refresh()

    def _text(self) -> str:
        """The full figures when the bar keeps 20 cells and the legend fits beside them."""
        marks = bool(self.budget or self.low or self.high)
        room = self.size.width - 9 - len(self.text) - 2 - (len(LEGEND) + 3 if marks else 0)
        return self.text if room >= 20 or not self.short_text else self.short_text

    def _legend_room(self, text: str) -> int:
        """Cells kept for the legend when the bar would still be 12 wide beside it."""
        if not (self.budget or self.low or self.high):
            return 0
        room = len(LEGEND) + 3
        return room if self.size.width - 9 - len(text) - 2 - room >= 12 else 0

    @property
    def fraction(self) -> float | None:
        if self.used is None or not self.total:
            return None
        return max(0.0, min(1.0, self.used / self.total))

    def render(self) -> Text:
        label = f"{self.label:<9}"
        text = self._text()
        width = max(10, self.size.width - len(label) - len(text) - 2 - self._legend_room(text))
        out = Text(label, style="bold")
        fraction = self.fraction
        if fraction is None:
            out.append("·" * width, style="dim")
        else:
            scale = self.budget or self.total or 1.0
            marks: dict[int, tuple[str, str]] = {}
            if self.budget and self.total:
                marks[min(width - 1, int(width * self.budget / self.total))] = ("▕", "bold magenta")
            for mark, char, style in ((self.low, "┊", "yellow"), (self.high, "┃", "red")):
                if mark and self.total:
                    marks[min(width - 1, int(width * mark * scale / self.total))] = (char, style)
            filled = int(round(width * fraction))
            level = (self.used or 0) / scale if scale else fraction
            colour = "red" if self.high and level >= self.high else "yellow" if self.low and level >= self.low else "green"
            for i in range(width):
                if i in marks:
                    out.append(*marks[i])
                elif i < filled:
                    out.append("█", style=colour)
                else:
                    out.append("░", style="dim")
        out.append(f" {text}")
        if self.fraction is not None and (self.budget or self.low or self.high):
            legend = " (" + " ".join(part for part, on in zip(LEGEND.split(), (self.low, self.high, self.budget)) if on) + ")"
            if out.cell_len + len(legend) <= self.size.width:
                out.append(legend, style="dim")
        return out
