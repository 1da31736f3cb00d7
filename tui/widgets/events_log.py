"""Event lines, coloured by level (the dashboard's pane and the events screen)."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from lastmile.tui.state import fmt_time

LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": ""}


def event_line(event: dict[str, Any]) -> Text:
    text = Text()
    text.append(fmt_time(event["time"]) + " ", style="dim")
    text.append(f"{event.get('level', 'info'):<7} ", style=LEVEL_STYLE.get(event.get("level", "info"), ""))  # "warning" is 7 wide
    text.append(f"{event.get('kind', ''):<15} ", style="cyan")
    text.append(event.get("message", ""), style=LEVEL_STYLE.get(event.get("level", "info"), ""))
    return text
