"""The TCP listener. Plain HTTP on an address other hosts can reach is
refused unless the config says so, and token guessing is slowed per peer with one log line
per peer instead of one per guess. Real daemons, real TCP sockets."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import start_tcp_daemon

pytestmark = pytest.mark.faults
TOKEN = "the-right-token-0123456789"


def test_plain_tcp_off_loopback_is_refused(demo_store: Path, tmp_path: Path) -> None:
    """Plain TCP on 0.0.0.0 without TLS would send the bearer token across the network in clear:
    the daemon refuses to start unless ``allow_insecure_tcp`` says so, and its log says why."""
    d, _ = start_tcp_daemon(tmp_path / "d", demo_store, TOKEN, server_extra='tcp_host = "0.0.0.0"', wait_ready=False)
    try:
        code = d.proc.wait(60)
    finally:
        d.stop()
    assert code != 0
    assert "allow_insecure_tcp" in d.log_text() and "in clear" in d.log_text(), d.log_text()
    assert not d.socket.exists(), "the Unix socket it bound is removed again"


async def test_token_guessing_is_slowed_and_logged_once_per_peer(demo_store: Path, tmp_path: Path) -> None:
    d, port = start_tcp_daemon(tmp_path / "d", demo_store, TOKEN, server_extra='tcp_host = "0.0.0.0"\nallow_insecure_tcp = true')
    try:
        assert "allow_insecure_tcp" in d.log_text() and "level=warning" in d.log_text()
        url = f"http://127.0.0.1:{port}/lm/v1/status"
        async with aiohttp.ClientSession() as session:
            statuses, started = [], time.monotonic()
            for i in range(60):
                async with session.get(url, headers={"Authorization": f"Bearer guess-{i:04d}-0123456789"}) as resp:
                    statuses.append(resp.status)
                    retry_after = resp.headers.get("Retry-After")
            elapsed = time.monotonic() - started
            # after a few 401s the peer is locked out: 429 without the token being compared
            assert statuses.count(401) <= 6 and statuses.count(429) >= 50, statuses
            assert retry_after is not None and int(retry_after) >= 1
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200, "the right token passes, locked out or not (issue 23.4)"
            time.sleep(int(retry_after) + 0.2)
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200
        denied = [line for line in d.log_text().splitlines() if "denied tcp=" in line]
        assert 1 <= len(denied) <= 3, denied
        print(f"\n60 guesses in {elapsed:.2f} s: {statuses.count(401)} compared (401), {statuses.count(429)} refused (429); "
              f"{len(denied)} log line(s)")
    finally:
        d.stop()
