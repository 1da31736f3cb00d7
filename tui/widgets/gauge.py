"""A one-line gauge: label, bar, figures; optional budget and watermark marks on the bar."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class Gauge(Static):
    """``used`` of ``total`` as a bar. ``budget`` (same unit) draws a ``▕`` where the budget
    ends; ``low``/``high`` are watermark fractions *of the budget* (or of ``total`` when there
    is no budget), drawn as ``┊`` (low, yellow) and ``┃`` (high, red)."""

    def __init__(self, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.used: float | None = None
        self.total: float | None = None
        self.text = "-"
        self.budget: float | None = None
        self.low: float | None = None
        self.high: float | None = None

    def set(self, used: float | None, total: float | None, text: str, *, budget: float | None = None, low: float | None = None, high: float | None = None) -> None:
        self.used, self.total, self.text, self.budget, self.low, self.high = used, total, text, budget, low, high
        self.refresh()

    @property
    def fraction(self) -> float | None:
        if self.used is None or not self.total:
            return None
        return max(0.0, min(1.0, self.used / self.total))

    def render(self) -> Text:
        label = f"{self.label:<9}"
        width = max(10, self.size.width - len(label) - len(self.text) - 2)
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
        out.append(f" {self.text}")
        return out
