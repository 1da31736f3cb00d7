"""One daemon for all the TUI and monitor tests (a daemon start costs ~10 s on 2 cores), on
the shared demo store; the banner test starts its own on a copy, since it stops it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import pytest

from tests.conftest import DaemonProc, start_daemon


@pytest.fixture(scope="session")
def tui_daemon(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = start_daemon(tmp_path_factory.mktemp("tui-daemon"), demo_store)
    yield proc
    proc.stop()


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, step: Callable[[], Awaitable[None]] | None = None, what: str | Callable[[], str] = "condition") -> None:
    """Poll ``predicate`` (letting the app run between polls) until it holds or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        if step is not None:
            await step()
        else:
            await asyncio.sleep(0.05)
