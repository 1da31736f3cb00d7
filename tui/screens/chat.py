"""The chat screen: talk to a loaded generation model; the answer streams in as it is written,
with its time to first token and tokens/s, and the model's running/waiting sequences and KV
cache from the monitor stream beside it.

The conversation goes through the same client call as ``lastmile chat``
(:func:`lastmile.appliance.client.chat.generate`, the OpenAI-compatible API), so what the
screen shows is what any client gets. Chatting changes nothing in the daemon, so the screen
stays available in read-only mode. Escape (or Ctrl-C in the field) stops an answer; that closes
the stream, which frees the sequence's slot in the daemon at once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Input, Label, RichLog, Select, Static

from lastmile.appliance.client.api import ApiError, ClientError
from lastmile.appliance.client.chat import Generation, SamplingOptions, generate
from lastmile.tui.screens.base import ModelPickerScreen
from lastmile.tui.state import MonitorState, generation_parts, pack, runs_long

MAX_TURNS = 50  # messages kept in the conversation sent back to the model


def default_options() -> SamplingOptions:
    """The sampling defaults ``lastmile chat`` uses (the client library's one set), so the
    screen and the CLI answer alike; a field left empty in the form keeps its default."""
    return SamplingOptions()


def _field_text(value: object) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


class ChatText(Message):
    """A piece of the answer being streamed."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ChatDone(Message):
    """The answer ended (``error`` set when it failed; ``result.stopped`` when stopped)."""

    def __init__(self, result: Generation | None, error: str | None) -> None:
        super().__init__()
        self.result, self.error = result, error


def engine_line(row: dict[str, Any], width: int = 100) -> str:
    """What runs the model and its live figures, from a monitor row (the dashboard's words),
    in lines of at most ``width``."""
    return pack([f"runs {runs_long(row)}", *generation_parts(row)], width)


class ChatScreen(ModelPickerScreen):
    PICKER_ID = "c-model"
    DEFAULT_CSS = """
    #chat-body { padding: 0 1; }
    #chat-bar { height: 3; }
    #c-model { width: 1fr; max-width: 48; min-width: 20; }
    #c-temp, #c-max { width: 10; }
    #chat-bar Label { padding: 1 0 0 0; }
    #c-engine, #c-stats { height: auto; padding: 0 1; color: $text-muted; }
    /* the gutter is kept even before the scrollbar shows: lines wrapped earlier never lose
       their last column under it */
    #c-log { height: 1fr; border-top: solid $panel-lighten-2; scrollbar-gutter: stable; }
    #c-answer { height: auto; max-height: 50%; padding: 0 1; }
    #c-input { dock: bottom; }
    """
    BINDINGS = [Binding("escape", "stop", "Stop answer"), Binding("ctrl+l", "clear", "New chat")]
    AUTO_FOCUS = "#c-input"  # a question typed on arrival goes into the box, not to the screen keys

    def compose_body(self) -> ComposeResult:
        with Vertical(id="chat-body"):
            with Horizontal(id="chat-bar"):
                yield Select([], id="c-model", prompt="pick a generation model")
                yield Label(" temp ")
                defaults = default_options()
                yield Input(_field_text(defaults.temperature), id="c-temp", type="number", placeholder="default")
                yield Label(" max tokens ")
                yield Input(_field_text(defaults.max_tokens), id="c-max", type="integer", placeholder="default")
                yield Button("New chat", id="c-clear")
            yield Static("", id="c-engine")
            yield RichLog(id="c-log", wrap=True, markup=False, max_lines=2000)
            yield Static("", id="c-answer")
            yield Static("", id="c-stats")
            yield Input(placeholder="message (Enter sends; Escape stops an answer)", id="c-input")

    def on_mount(self) -> None:
        super().on_mount()
        self.history: list[dict[str, str]] = []
        self.answer = ""
        self.busy = False
        self.last: Generation | None = None
        self.redraw()

    def refresh_from(self, state: MonitorState) -> None:
        rows = [r for r in state.models if "generation" in r and r["state"] in ("ready", "restarting")]
        self.set_model_names(tuple(r["name"] for r in rows))
        name = self.model_name
        row = next((r for r in rows if r["name"] == name), None)
        engine = self.query_one("#c-engine", Static)
        engine.update(engine_line(row, max(40, engine.content_region.width or self.app.size.width - 6)) if row else "no generation model loaded" if not rows else "")

    def _options(self) -> SamplingOptions | None:
        """The form's sampling fields over the shared defaults (an empty field: the default)."""
        defaults = default_options()
        temp_text = self.query_one("#c-temp", Input).value.strip()
        max_text = self.query_one("#c-max", Input).value.strip()
        try:
            temperature = float(temp_text) if temp_text else defaults.temperature
            max_tokens = int(max_text) if max_text else defaults.max_tokens
        except ValueError:
            self.lm.report_error("temperature must be a number and max tokens an integer")
            return None
        return replace(defaults, temperature=temperature, max_tokens=max_tokens)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "c-input":
            return
        text = event.value.strip()
        if not text or self.busy:
            return
        name = self.model_name
        if name is None:
            self.lm.report_error("pick a loaded generation model first")
            return
        options = self._options()
        if options is None:
            return
        event.input.value = ""
        self.history.append({"role": "user", "content": text})
        self.history = self.history[-MAX_TURNS:]
        log = self.query_one("#c-log", RichLog)
        log.write(Text(f"you: {text}", style="bold"))
        self.answer = ""
        self.busy = True
        self.query_one("#c-stats", Static).update(f"{name} is writing...")
        self.ask(name, list(self.history), options)

    @work(group="chat", exclusive=True, exit_on_error=False)
    async def ask(self, name: str, messages: list[dict[str, str]], options: SamplingOptions) -> None:
        try:
            result = await generate(self.lm.client, name, messages=messages, options=options,
                                    on_text=lambda piece: self.post_message(ChatText(piece)))
        except ClientError as exc:
            self.post_message(ChatDone(None, exc.message if isinstance(exc, ApiError) else str(exc)))
            return
        self.post_message(ChatDone(result, None))

    def on_chat_text(self, message: ChatText) -> None:
        self.answer += message.text
        self.query_one("#c-answer", Static).update(Text(self.answer))

    def on_chat_done(self, message: ChatDone) -> None:
        self.busy = False
        answer = self.query_one("#c-answer", Static)
        stats = self.query_one("#c-stats", Static)
        log = self.query_one("#c-log", RichLog)
        name = self.model_name or "model"
        if message.error:
            self.history.pop()
            stats.update(Text(message.error, style="red"))
            self.lm.report_error(message.error)
            return
        result = message.result
        assert result is not None
        self.last = result
        self.history.append({"role": "assistant", "content": result.text})
        log.write(Text(f"{name}: {result.text}"))
        answer.update("")
        stats.update(result.summary())

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop" and not getattr(self, "busy", False):
            return False  # Escape keeps its app-wide meaning (leave the field) when nothing streams
        return super().check_action(action, parameters)

    def action_stop(self) -> None:
        """Stop the answer being written (the stream closes; the daemon frees the slot)."""
        if not self.busy:
            return
        for worker in self.workers:
            if worker.group == "chat":
                worker.cancel()
        self.busy = False
        if self.answer:
            self.history.append({"role": "assistant", "content": self.answer})
            self.query_one("#c-log", RichLog).write(Text(f"{self.model_name}: {self.answer} [stopped]"))
        else:
            self.history.pop()
        self.query_one("#c-answer", Static).update("")
        self.query_one("#c-stats", Static).update("stopped")

    def action_clear(self) -> None:
        self.action_stop()
        self.history.clear()
        self.query_one("#c-log", RichLog).clear()
        self.query_one("#c-stats", Static).update("new conversation")

    @on(Button.Pressed, "#c-clear")
    def _clear_pressed(self) -> None:
        self.action_clear()
