"""The command palette's lastmile commands (ctrl+p): go to a screen, change the stream rate,
pause; and, unless read-only, load/unload/reload/tune a model by name."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from lastmile.tui.app import LastmileApp


class LastmileCommands(Provider):
    def _commands(self) -> list[tuple[str, Callable[[], object], str]]:
        app: "LastmileApp" = self.app  # type: ignore[assignment]
        out: list[tuple[str, Callable[[], object], str]] = []
        for mode, title in app.SCREEN_TITLES.items():
            out.append((f"Go to {title}", partial(app.switch_mode, mode), f"show the {title} screen"))
        out.append(("Resume updates" if app.paused else "Pause updates", app.action_toggle_pause, "freeze or resume the live figures"))
        for rate in app.RATES:
            out.append((f"Refresh rate {rate:g} Hz", partial(app.set_rate, rate), "snapshots per second from the daemon"))
        loaded = [r["name"] for r in app.state.models]
        for name in loaded:
            out.append((f"Play with {name}", partial(app.open_on, "playground", name), "send a request to it"))
        for name in loaded:
            out.append((f"Show {name}", partial(app.open_detail, name), "its runners, settings, memory, errors and events"))
        if not app.read_only:
            for name in app.store_names:
                # "Load X" exists for a loaded model too (the form asks before reloading it): a
                # typed "load X" must never match only "Unload X", which would do the opposite
                help_text = "open the load form with it" if name not in loaded else "loaded: the load form reloads it with new settings"
                out.append((f"Load {name}", partial(app.open_on, "models", name), help_text))
            for name in loaded:
                out.append((f"Tune {name}", partial(app.open_on, "tune", name), "change its batching, fusion, memory limit"))
                out.append((f"Unload {name}", partial(app.confirm_on_models, "unload", name), "asks first"))
                out.append((f"Reload {name}", partial(app.confirm_on_models, "reload", name), "asks first"))
        return out

    def ranked(self, query: str) -> list[tuple[float, str]]:
        """``(score, command)`` best first, as the palette orders them (tests read this)."""
        matcher = self.matcher(query)
        scored = [(matcher.match(text), text) for text, _, _ in self._commands()]
        return sorted([s for s in scored if s[0] > 0], key=lambda s: -s[0])

    async def discover(self) -> Hits:
        for text, command, help_text in self._commands():
            yield DiscoveryHit(text, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, command, help_text in self._commands():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), command, text=text, help=help_text)
