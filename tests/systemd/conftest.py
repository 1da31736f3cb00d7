"""Fixtures for the systemd/auth tests: temp dirs with short paths, sd_notify receivers."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sdhelpers import NotifyReceiver, make_receiver  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short, world-traversable temp dir (AF_UNIX paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="lm-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify_receiver(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[NotifyReceiver]:
    """A receiver bound to a filesystem path, then (second run) an abstract name."""
    receiver = make_receiver(request.param, short_tmp)
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
def notify_path_receiver(short_tmp: Path) -> Iterator[NotifyReceiver]:
    receiver = make_receiver("path", short_tmp)
    try:
        yield receiver
    finally:
        receiver.close()
