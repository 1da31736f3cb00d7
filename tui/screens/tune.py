"""The tune screen: change a loaded model's batching, graph fusion and memory limit live, next
to its live figures so the effect shows."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Sparkline, Static

from lastmile.appliance.client.api import ApiError, ClientError
from lastmile.appliance.client.wording import without_model_prefix
from lastmile.tui.forms import GRAPH_FUSION, RELOADING_KEYS, FormError, reload_note, tune_changes
from lastmile.tui.messages import Tuned
from lastmile.tui.screens.base import ModelPickerScreen
from lastmile.tui.screens.confirm import ConfirmScreen
from lastmile.tui.wording import changes_text, flag, flags, value_text
from lastmile.tui.state import MonitorState, fmt_memory, fmt_ms, fmt_rate, generation_parts, is_generation, pack, runs_long

RELOAD_NOTE = reload_note()


TRIAL_HEADER = "    # batch delay ms   fusion thr    rows/s  p50 ms  p99 ms"


def _trial_row(label: str, t: Any) -> str:
    """One trial in :data:`TRIAL_HEADER`'s columns (62 wide: no wrap at 80x24; the CLI's table
    is 80+ wide). ``t`` is an autotune ``Trial`` or its progress-event dict."""
    get = (lambda k: t.get(k)) if isinstance(t, dict) else (lambda k: getattr(t, k))
    s = get("settings")
    head = f"{label:>5} {s['max_batch_size']:>5} {s['max_delay_ms']:>8g} {s['graph_fusion']:>8} {s['threads']:>3}"
    if get("error") and not get("rows_per_s"):
        return f"{head}  failed: {get('error')}"
    return f"{head} {get('rows_per_s'):>9.1f} {get('p50_ms') or 0:>7.2f} {get('p99_ms') or 0:>7.2f}"


def trial_table(result: Any) -> str:
    """The auto-tune trials, the best marked ``*``, then the best as the flags that set it."""
    lines = [TRIAL_HEADER]
    for i, t in enumerate(result.trials, 1):
        lines.append(_trial_row(str(i), t) + (" *" if result.best is t else ""))
    lines.append(f"best (*): {flags(result.best.settings)}" if result.best is not None else "no trial succeeded")
    return "\n".join(lines)


def trial_line(index: int, total: int, trial: dict[str, Any]) -> str:
    """A progress line while the trials run, in the table's columns."""
    return _trial_row(f"{index}/{total}", trial)


class TuneScreen(ModelPickerScreen):
    """``t`` opens this screen everywhere; the auto-tuner is ``o`` (optimise) so that no key
    means two things here. The verdict of a change or an auto-tune run shows just under the
    model picker, where the eye is, and the form scrolls on a short terminal."""

    PICKER_ID = "t-model"
    BINDINGS = [Binding("a", "apply", "Apply"), Binding("z", "revert", "Revert form"), Binding("o", "autotune", "Auto-tune")]
    MUTATING_ACTIONS = ("apply", "autotune")
    DEFAULT_CSS = """
    TuneScreen #tune-body { height: 1fr; }
    TuneScreen #tune-form { width: 1fr; padding: 0 1; }
    TuneScreen #tune-live { width: 1fr; height: auto; padding: 0 1; border-left: solid $panel-lighten-2; }
    TuneScreen #tune-live Sparkline { height: 3; }
    TuneScreen #tune-note, TuneScreen #tune-result { padding: 0 1; color: $text-muted; }
    TuneScreen #tune-verdict { padding: 0 1; height: auto; }
    TuneScreen.-narrow #tune-body { layout: vertical; overflow-y: auto; }
    TuneScreen.-narrow #tune-form { height: auto; }
    TuneScreen.-narrow #tune-live { border-left: none; border-top: solid $panel-lighten-2; }
    TuneScreen.-narrow #tune-live Sparkline { height: 2; }
    """

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="tune-body"):
            with VerticalScroll(id="tune-form"):
                yield Label("Tune a loaded model", classes="section")
                yield Select([], id="t-model", prompt="pick a loaded model")
                yield Static("", id="tune-verdict")
                with Grid(id="tune-grid"):
                    yield Label("max batch size")
                    yield Input(id="t-max_batch_size", type="integer")
                    yield Label("max delay ms")
                    yield Input(id="t-max_delay_ms", type="number")
                    yield Label("graph fusion")
                    yield Select([(v, v) for v in GRAPH_FUSION], allow_blank=False, value="basic", id="t-graph_fusion")
                    yield Label("memory limit MiB")
                    yield Input(id="t-memory_limit_mb", type="integer", placeholder="none")
                yield Static(RELOAD_NOTE, id="tune-note")
                with Horizontal(id="tune-buttons", classes="mutating"):
                    yield Button("Apply", variant="success", id="b-apply", action="screen.apply")
                    yield Button("Revert", id="b-revert", action="screen.revert")
                    yield Button("Auto-tune (o)", id="b-autotune", action="screen.autotune")
                yield Static("", id="tune-result")
            with Vertical(id="tune-live"):
                yield Label("Live figures", classes="section")
                yield Static("", id="live-figures")
                yield Label("requests/s", id="tl-rps")
                yield Sparkline([], id="ts-rps")
                yield Label("latency p99 ms", id="tl-p99")
                yield Sparkline([], id="ts-p99")

    def verdict(self, text: Text | str) -> None:
        """The outcome of the last apply or auto-tune, under the picker (and into view)."""
        box = self.query_one("#tune-verdict", Static)
        box.update(text)
        box.scroll_visible(animate=False)

    def on_mount(self) -> None:
        super().on_mount()
        self._names: tuple[str, ...] = ()
        self._filled_for: str | None = None
        if self.lm.read_only:
            for widget in self.query("#tune-grid Input, #tune-grid Select"):
                widget.disabled = True
            self.query_one("#tune-note", Static).update("read-only mode: settings are shown, not changed. " + RELOAD_NOTE)
        self.redraw()

    def refresh_from(self, state: MonitorState) -> None:
        self.set_model_names(tuple(r["name"] for r in state.models))
        name = self.model_name
        row = state.model(name) if name else None
        if row is not None and self._filled_for != name:
            self.fill(row["settings"])
            self._filled_for = name
        self._show_live(state, row)

    def _show_live(self, state: MonitorState, row: dict[str, Any] | None) -> None:
        figures = self.query_one("#live-figures", Static)
        if row is None:
            figures.update("no model selected")
            return
        s, lat = row.get("settings") or {}, row.get("latency_ms") or {}
        width = max(30, figures.content_region.width or (self.app.size.width // 2 - 4))
        text = Text()
        text.append(f"{row['name']}  ", style="bold")
        shown = state.shown_state(row)
        text.append(shown + ("  (daemon unreachable)" if state.stale else "") + "\n", style="green" if shown == "ready" else "yellow")
        # short phrases packed to the panel's width: a row of figures never wraps mid-figure
        if is_generation(row):
            parts = [f"runs {runs_long(row)}", *generation_parts(row)]
        else:
            parts = [f"req/s {fmt_rate(row.get('requests_per_s'))}", f"p50 {fmt_ms(lat.get('p50'))} ms", f"p95 {fmt_ms(lat.get('p95'))} ms",
                     f"p99 {fmt_ms(lat.get('p99'))} ms", f"avg batch {row.get('avg_batch_size') or 0:.1f} rows", f"queue {row.get('queue_depth', 0)}"]
        parts += [f"requests {row.get('requests', 0)}", f"failures {row.get('failures', 0)}"]
        text.append(pack(parts, width) + "\n")
        memory = fmt_memory(row)
        text.append(pack([f"memory {memory.partition(' (')[0]}", *(["(" + memory.partition(" (")[2]] if " (" in memory else [])], width) + "\n")
        limit = f"{s.get('memory_limit_mb')} MiB" if s.get("memory_limit_mb") else "none"
        text.append(pack([f"now: max batch {s.get('max_batch_size')},", f"max delay {value_text(s.get('max_delay_ms'))} ms,",
                          f"fusion {s.get('graph_fusion')},", f"limit {limit}"], width, sep=" "), style="dim")
        figures.update(text)
        series = state.series.get(row["name"])
        if series is not None:
            self.query_one("#ts-rps", Sparkline).data = list(series.rps) or [0.0]
            self.query_one("#ts-p99", Sparkline).data = list(series.p99) or [0.0]
            self.query_one("#tl-rps", Label).update(f"requests/s: {fmt_rate(series.rps[-1] if series.rps else None)}")
            self.query_one("#tl-p99", Label).update(f"latency p99: {fmt_ms(series.p99[-1] if series.p99 else None)} ms")

    def fill(self, settings: dict[str, Any]) -> None:
        self.query_one("#t-max_batch_size", Input).value = str(settings.get("max_batch_size", ""))
        self.query_one("#t-max_delay_ms", Input).value = f"{settings.get('max_delay_ms', '')}"
        self.query_one("#t-graph_fusion", Select).value = settings.get("graph_fusion", "basic")
        limit = settings.get("memory_limit_mb")
        self.query_one("#t-memory_limit_mb", Input).value = "" if limit is None else str(limit)

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "t-model" and isinstance(event.value, str):
            row = self.lm.state.model(event.value)
            if row is not None:
                self.fill(row["settings"])
                self._filled_for = event.value
                self._show_live(self.lm.state, row)

    def form_values(self) -> dict[str, str]:
        fusion = self.query_one("#t-graph_fusion", Select).value
        return {
            "max_batch_size": self.query_one("#t-max_batch_size", Input).value,
            "max_delay_ms": self.query_one("#t-max_delay_ms", Input).value,
            "graph_fusion": fusion if isinstance(fusion, str) else "",
            "memory_limit_mb": self.query_one("#t-memory_limit_mb", Input).value,
        }

    def action_revert(self) -> None:
        row = self.lm.state.model(self.model_name) if self.model_name else None
        if row is not None:
            self.fill(row["settings"])

    def action_apply(self) -> None:
        if not self.lm.writable("tune a model"):
            return
        name = self.model_name
        row = self.lm.state.model(name) if name else None
        if name is None or row is None:
            self.lm.report_error("pick a loaded model to tune")
            return
        try:
            changes = tune_changes(row["settings"], self.form_values())
        except FormError as exc:
            self.lm.report_error(f"{exc.field}: {exc.message}")
            self.query_one(f"#t-{exc.field}").focus()
            return
        if not changes:
            self.app.notify("nothing to change: the form matches the model's settings")
            return
        reloading = sorted(set(changes) & set(RELOADING_KEYS))
        if reloading:
            self.app.push_screen(
                ConfirmScreen(f"Changing {', '.join(flag(k) for k in reloading)} reloads {name} (a pause in serving). Go on?", "Apply"),
                lambda yes: yes and self.send_tune(name, changes),
            )
        else:
            self.send_tune(name, changes)

    # --- the auto-tuner (lastmile.appliance.client.autotune): a sweep under load, the best setting applied ---

    def action_autotune(self) -> None:
        if not self.lm.writable("auto-tune a model"):
            return
        name = self.model_name
        if name is None or self.lm.state.model(name) is None:
            self.lm.report_error("pick a loaded model to auto-tune")
            return
        self.app.push_screen(
            ConfirmScreen(f"Auto-tune sends load to {name} and reloads it for fusion/threads trials "
                          "(pauses in serving), then applies the best setting. Go on?", "Auto-tune"),
            lambda yes: yes and self.run_autotune(name),
        )

    @work(group="autotune", exclusive=True, exit_on_error=False)
    async def run_autotune(self, name: str) -> None:
        from lastmile.appliance.client.autotune import Tuner

        out = self.query_one("#tune-result", Static)
        lines: list[str] = []

        def progress(event: dict[str, Any]) -> None:
            if event["event"] == "start":
                lines.append(f"auto-tuning {name}: {event['total']} trials\n{TRIAL_HEADER}")
            elif event["event"] == "trial":
                lines.append(trial_line(event["index"], event["total"], event["trial"]))
            out.update("\n".join(lines[:1] + lines[1:][-7:]))  # the header stays

        self.verdict(Text(f"auto-tuning {name}: trials running, progress below ...", style="yellow"))
        try:
            result = await Tuner(self.lm.client, name, clients=16, duration_s=1.0, progress=progress).run(apply=True)
        except (ClientError, ValueError) as exc:
            out.update(Text(f"auto-tune failed: {exc}", style="red"))
            self.verdict(Text(f"auto-tune of {name} failed: {without_model_prefix(name, str(exc))}", style="bold red"))
            return
        out.update(trial_table(result))
        if result.best is not None:
            best = result.best
            self.verdict(Text(f"auto-tune of {name}: best {flags(best.settings)} at {best.rows_per_s:.0f} rows/s, p99 {value_text(best.p99_ms)} ms"
                              + (" - applied and saved" if result.applied else " - not applied"), style="bold green"))
            self.app.notify(escape(f"{name}: auto-tune applied {flags(best.settings)}"))
        else:
            self.verdict(Text(f"auto-tune of {name}: no trial succeeded; settings unchanged (table below)", style="bold red"))
        if result.best is not None:
            self.fill({**(self.lm.state.model(name) or {}).get("settings", {}), **result.best.settings})

    @work(group="tune", exclusive=True, exit_on_error=False)
    async def send_tune(self, name: str, changes: dict[str, Any]) -> None:
        if self.lm.read_only:  # the gate again, for any path that reaches here
            self.post_message(Tuned(name, changes, None, "read-only mode: settings cannot be changed"))
            return
        self.query_one("#tune-result", Static).update(f"applying {changes_text(changes)} to {name} ...")
        try:
            row = await self.lm.client.tune(name, changes)
        except ClientError as exc:
            self.post_message(Tuned(name, changes, None, exc.message if isinstance(exc, ApiError) else str(exc)))
            return
        self.post_message(Tuned(name, changes, row, None))

    def on_tuned(self, message: Tuned) -> None:
        result = self.query_one("#tune-result", Static)
        if message.error:
            error = without_model_prefix(message.name, message.error)
            result.update(Text(f"not applied: {error}", style="red"))
            self.verdict(Text(f"not applied to {message.name}: {error}", style="bold red"))
            self.lm.report_error(message.error, model=message.name)
            return
        result.update(Text(f"applied to {message.name}: {changes_text(message.changes)}", style="green"))
        self.verdict(Text(f"applied to {message.name}: {changes_text(message.changes)}", style="bold green"))
        self.app.notify(escape(f"{message.name}: {changes_text(message.changes)} applied"))
        if message.row is not None:
            self.fill(message.row["settings"])
