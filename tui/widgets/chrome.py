"""The strip every screen shows: the daemon status bar and the connection banner."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import Static

from lastmile.tui.state import MonitorState, fmt_time, fmt_uptime


START_HINT = "This screen reconnects when it is up."


class StatusBar(Static):
    """lastmile version, daemon status, uptime, socket, models loaded, stream rate, modes."""

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        color: $text;
    }
    """

    def show(self, state: MonitorState, *, where: str, rate_hz: float, paused: bool, read_only: bool) -> None:
        d = state.daemon
        text = Text()
        text.append(" lastmile ", style="bold reverse")
        text.append(f" {d.get('version', '?')} ")
        if state.connection.state == "ok":
            status = d.get("status", "?")
            text.append(" ● ", style="green" if d.get("ready") else "yellow")
            text.append(status)
            text.append(f"  up {fmt_uptime(d.get('uptime_s'))}")
            text.append(f"  pid {d.get('pid', '?')}")
            text.append(f"  {d.get('models_loaded', 0)} loaded")
        elif state.connection.state == "lost":
            text.append(" ● ", style="red")
            text.append("daemon unreachable", style="bold red")
            if state.snapshot is not None:
                text.append(f"  figures from {fmt_time(state.snapshot.get('time') or time.time())}", style="dim")
        else:
            text.append(" ● ", style="yellow")
            text.append("connecting")
        text.append(f"  {d.get('socket') or where}", style="dim")
        text.append(f"  {rate_hz:g} Hz", style="cyan")
        if paused:
            text.append("  PAUSED", style="bold black on yellow")
        if read_only:
            text.append("  READ-ONLY", style="bold black on cyan")
        self.update(text)


class Banner(Static):
    """Shown while the monitor stream is down: what happened, that it is retrying, and how to
    start the daemon when none is running."""

    DEFAULT_CSS = """
    Banner {
        height: auto;
        padding: 0 1;
        background: $warning 30%;
        color: $text;
        text-style: bold;
    }
    Banner.-lost {
        background: $error;
        color: $text;
    }
    """

    def show(self, state: MonitorState, *, where: str) -> None:
        conn = state.connection
        if conn.state == "ok":
            self.display = False
            return
        self.display = True
        self.set_class(conn.state == "lost", "-lost")
        if conn.state == "lost":
            seen = state.snapshot.get("time") if state.snapshot else None
            lost_for = int(time.time() - conn.since)
            text = (
                f"⚠ CONNECTION TO THE DAEMON LOST ({conn.error or 'no answer'}) on {where}. "
                f"Retrying by itself (attempt {conn.attempt}, every {conn.retry_in_s:g} s) for {lost_for} s."
            )
            if seen:
                text += f" Figures shown are from {fmt_time(seen)}."
            if "not running" in (conn.error or ""):
                text += f" Start it: `lastmile serve` (or `sudo systemctl start lastmile` on a system install). {START_HINT}"
        else:
            text = f"Connecting to the daemon on {where} ..."
        self.update(text)
