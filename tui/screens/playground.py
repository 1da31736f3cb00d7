"""The playground: send a request to a loaded model (random input from its spec, .npy files,
or text for a text model), see the outputs, the latency, and which batch the request rode in. A burst of N
concurrent requests shows the dynamic batcher at work."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, RichLog, Select, Static

from lastmile.appliance.client.api import ApiError, ClientError
from lastmile.appliance.client.wording import without_model_prefix
from lastmile.tui.forms import FormError, file_inputs, parse_int, random_inputs, summarize_output
from lastmile.tui.messages import InferDone, SpecFetched
from lastmile.tui.screens.base import ModelPickerScreen
from lastmile.tui.state import MonitorState, runs_short
from lastmile.tui.wording import platform_name


class PlaygroundScreen(ModelPickerScreen):
    """Inference does not change the daemon's state, so it stays available in read-only mode."""

    DEFAULT_CSS = """
    PlaygroundScreen #play-body { padding: 0 1; }
    PlaygroundScreen #p-spec, PlaygroundScreen #p-summary { height: auto; padding: 0 1; }
    PlaygroundScreen #p-output { height: 1fr; min-height: 8; border-top: solid $panel-lighten-2; }
    """

    PICKER_ID = "p-model"

    BINDINGS = [Binding("ctrl+r", "send_random", "Send random"), Binding("ctrl+f", "send_file", "Send file")]

    def compose_body(self) -> ComposeResult:
        # scrolls on a short terminal: the buttons and the results stay reachable at 80x24
        with VerticalScroll(id="play-body", can_focus=False):
            yield Label("Playground: send an inference request", classes="section")
            with Grid(id="play-grid"):
                yield Label("model")
                yield Select([], id="p-model", prompt="pick a loaded model")
                yield Label("rows (batch dim)")
                yield Input("1", id="p-rows", type="integer")
                yield Label("variable dims")
                yield Input("8", id="p-seq", type="integer")
                yield Label("burst (concurrent)")
                yield Input("1", id="p-burst", type="integer")
                yield Label(".npy file(s)")
                yield Input(placeholder="path.npy  or  name=path.npy,name=path.npy", id="p-files")
                yield Label("text(s)")
                yield Input(placeholder="for text models: one text, or several separated by ' || '", id="p-text")
            yield Static("", id="p-spec")
            with Horizontal(id="play-buttons"):
                yield Button("Send random input", variant="primary", id="b-random", action="screen.send_random")
                yield Button("Send file input", id="b-file", action="screen.send_file")
                yield Button("Send text", id="b-text", action="screen.send_text")
            yield Static("", id="p-summary")
            yield RichLog(id="p-output", wrap=True, markup=False, max_lines=400)

    def on_mount(self) -> None:
        super().on_mount()
        self._names: tuple[str, ...] = ()
        self.specs: dict[str, dict[str, Any]] = {}
        self.last_results: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.redraw()

    def refresh_from(self, state: MonitorState) -> None:
        self.set_model_names(tuple(r["name"] for r in state.models if r["state"] in ("ready", "restarting")))

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "p-model" and isinstance(event.value, str):
            self.fetch_spec(event.value)

    @work(group="spec", exclusive=True, exit_on_error=False)
    async def fetch_spec(self, name: str) -> None:
        try:
            meta = await self.lm.client.metadata(name)
        except ClientError as exc:
            self.post_message(SpecFetched(name, None, str(exc)))
            return
        self.post_message(SpecFetched(name, meta, None))

    def on_spec_fetched(self, message: SpecFetched) -> None:
        spec = self.query_one("#p-spec", Static)
        if message.metadata is None:
            spec.update(Text(f"{message.name}: {message.error}", style="red"))
            return
        self.specs[message.name] = message.metadata
        def tensors(kind: str) -> str:
            return ", ".join(f"{t['name']} {t['datatype']}[{','.join(str(d) for d in t['shape'])}]" for t in message.metadata.get(kind, []))

        ins, outs = tensors("inputs"), tensors("outputs")
        row = self.lm.state.model(message.name)
        engine = runs_short(row) if row else platform_name(message.metadata.get("platform"))
        spec.update(f"{message.name} ({engine}): inputs {ins or '-'}  ->  outputs {outs or '-'}")

    def _numbers(self) -> tuple[int, int, int]:
        rows, seq, burst = (
            parse_int(wid, self.query_one(f"#{wid}", Input).value.strip() or "1", low, high) or 1
            for wid, low, high in (("p-rows", 1, 4096), ("p-seq", 1, 65536), ("p-burst", 1, 256))
        )
        return rows, seq, burst

    def _prepare(self, source: str) -> tuple[str, dict[str, Any], dict[str, str], int] | None:
        name = self.model_name
        if name is None:
            self.lm.report_error("pick a loaded model first")
            return None
        meta = self.specs.get(name)
        if meta is None:
            self.lm.report_error(f"the spec of {name} is not known yet; try again in a moment")
            self.fetch_spec(name)
            return None
        try:
            rows, seq, burst = self._numbers()
            if source == "file":
                arrays, types = file_inputs(meta.get("inputs", []), self.query_one("#p-files", Input).value)
            else:
                arrays, types = random_inputs(meta.get("inputs", []), rows=rows, seq=seq)
        except FormError as exc:
            self.lm.report_error(f"{exc.field}: {exc.message}")
            return None
        return name, arrays, types, burst

    def action_send_random(self) -> None:
        prepared = self._prepare("random")
        if prepared:
            self.send(*prepared)

    def action_send_file(self) -> None:
        prepared = self._prepare("file")
        if prepared:
            self.send(*prepared)

    def action_send_text(self) -> None:
        texts = [t.strip() for t in self.query_one("#p-text", Input).value.split("||") if t.strip()]
        if self.model_name is None or not texts:
            self.lm.report_error("pick a loaded text model and type a text first")
            return
        self.send_text(self.model_name, texts)

    @work(group="infer", exclusive=True, exit_on_error=False)
    async def send_text(self, name: str, texts: list[str]) -> None:
        """A text model's answer (embeddings preview, or labels and scores), as the CLI prints it."""
        from lastmile.appliance.client.text_cli import format_text_result, infer_text

        summary, log = self.query_one("#p-summary", Static), self.query_one("#p-output", RichLog)
        try:
            response = await infer_text(self.lm.client, name, texts)
        except ClientError as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            summary.update(Text(f"{name}: {message}", style="red"))
            self.lm.report_error(message)
            return
        summary.update(Text(f"{name}: {len(texts)} text(s)", style="bold"))
        log.clear()
        log.write(format_text_result(texts, response))

    @work(group="infer", exclusive=True, exit_on_error=False)
    async def send(self, name: str, arrays: dict[str, Any], types: dict[str, str], burst: int) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.gather(*(self.lm.client.infer(name, arrays, types) for _ in range(burst)))
        except ClientError as exc:
            self.post_message(InferDone(name, [], exc.message if isinstance(exc, ApiError) else str(exc), 0.0))
            return
        self.post_message(InferDone(name, list(results), None, (time.perf_counter() - started) * 1000))

    def on_infer_done(self, message: InferDone) -> None:
        summary = self.query_one("#p-summary", Static)
        log = self.query_one("#p-output", RichLog)
        if message.error:
            summary.update(Text(f"{message.name}: {without_model_prefix(message.name, message.error)}", style="red"))
            self.lm.report_error(message.error, model=message.name)
            return
        self.last_results = message.results
        outputs, params = message.results[0]
        batches = sorted({(p.get("batch_id"), p.get("batch_size")) for _, p in message.results}, key=lambda b: b[0] or 0)
        text = Text()
        text.append(f"{message.name}: {len(message.results)} request(s) in {message.wall_ms:.1f} ms\n", style="bold")
        text.append(
            f"first request: client {params.get('client_ms')} ms, daemon {params.get('total_ms')} ms "
            f"(queue {params.get('queue_ms')} ms, compute {params.get('compute_ms')} ms), "
            f"rode in batch #{params.get('batch_id')} ({params.get('batch_size')} row(s) in that batch)\n"
        )
        text.append("batches used: " + ", ".join(f"#{b} ({s} row(s))" for b, s in batches))
        summary.update(text)
        log.clear()
        for out_name, array in outputs.items():
            log.write(summarize_output(out_name, array))
        summary.scroll_visible(animate=False, top=True)  # the results where the eye is, on a short terminal too
