"""A generation model in the TUI against a real daemon (the tiny causal LM on ORT-GenAI int4):
while a chat streams, its dashboard row says what the runner runs and shows tokens/s above 0,
and its detail view has TTFT, inter-token, running/waiting and KV figures from the daemon's
own fields (the offline tests in test_first_hour.py cover the layout; this one the names)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Iterator

import pytest
from rich.console import Console

from lastmile.appliance.client.api import LastmileClient
from lastmile.appliance.client.chat import SamplingOptions, generate
from lastmile.tui.app import LastmileApp
from lastmile.tui.screens.detail import ModelDetailScreen
from lastmile.tui.widgets.models_table import ModelsTable
from tests.conftest import DaemonProc, start_daemon
from tests.tui.conftest import wait_until

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def gen_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    from lastmile.runtime.generation.tiny import build_tiny_lm

    home = tmp_path_factory.mktemp("tui-gen")
    store = home / "store"
    store.mkdir()
    build_tiny_lm(store / MODEL)
    daemon = start_daemon(home / "d", store)
    yield daemon
    daemon.stop()


def _text(renderable: object) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return " ".join(console.export_text().split())


async def test_generation_model_is_visible_while_it_serves(gen_daemon: DaemonProc) -> None:
    async with LastmileClient(gen_daemon.socket) as client:
        # the manifest's settings say dtype fp32; what runs is the runner's report
        await client.load(MODEL, {"engine": "ort-genai", "precision": "int4", "max_num_seqs": 4})
        app = LastmileApp(LastmileClient(gen_daemon.socket), rate_hz=5)
        async with app.run_test(size=(120, 40)) as pilot:
            step = lambda: pilot.pause(0.1)  # noqa: E731
            table = app.screen.query_one(ModelsTable)
            await wait_until(lambda: MODEL in table.visible_names(), step=step, what="the model in the table")
            assert table.cell_text(MODEL, "runs") == "ort-genai int4"
            stop = asyncio.Event()

            async def chat() -> None:
                while not stop.is_set():
                    await generate(client, MODEL, messages=[{"role": "user", "content": "Tell me a story"}],
                                   options=SamplingOptions(max_tokens=48))

            chats = [asyncio.create_task(chat()) for _ in range(2)]
            try:
                def tokens_per_s() -> float:
                    return float((table.cell_text(MODEL, "rps") or "0").split()[0].replace("-", "0"))

                await wait_until(lambda: tokens_per_s() > 0, timeout=30, step=step, what=lambda: f"tokens/s, row {app.state.model(MODEL)}")
                assert (table.cell_text(MODEL, "rps") or "").endswith("tok/s")
                assert table.cell_text(MODEL, "ttft") not in (None, "-")
                app.open_detail(MODEL)
                await wait_until(lambda: isinstance(app.screen, ModelDetailScreen) and app.screen.query("#detail-head"), step=step)
                head = lambda: _text(app.screen.query_one("#detail-head").content)  # noqa: E731
                await wait_until(lambda: "inter-token p50 -" not in head() and "TTFT p50 -" not in head(), timeout=15, step=step, what=head)
                text = head()
                for words in ("runs ort-genai int4 on cpu", "tokens/s", "TTFT p50", "inter-token p50", "running", "waiting", "KV used/reserved"):
                    assert words in text, (words, text)
                assert "avg batch" not in text and "deepspeed" not in text
            finally:
                stop.set()
                for task in chats:
                    task.cancel()
                await asyncio.gather(*chats, return_exceptions=True)
            assert app.errors == [], app.errors
