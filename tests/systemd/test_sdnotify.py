"""sd_notify datagrams on a real AF_UNIX socket (path and abstract), and the watchdog."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from lastmile.appliance.server import sdnotify
from lastmile.appliance.server.sdnotify import Watchdog, notify, watchdog_interval_s


def test_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY=1) is False


def test_notify_sends_one_datagram(notify_receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_receiver.address)
    assert notify(READY=1, STATUS="restoring 2 models\nsecond line") is True
    assert sdnotify.extend_timeout(120, "loading big") is True
    assert sdnotify.stopping() is True
    msg = notify_receiver.wait_for("READY", "1")
    # One datagram carries both fields; a newline in STATUS cannot start a new field.
    assert msg == {"READY": "1", "STATUS": "restoring 2 models second line"}
    assert notify_receiver.wait_for("EXTEND_TIMEOUT_USEC") == {
        "EXTEND_TIMEOUT_USEC": "120000000", "STATUS": "loading big"}
    notify_receiver.wait_for("STOPPING", "1")


def test_notify_to_a_dead_socket_returns_false(short_tmp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "nobody-listens"))
    assert notify(STATUS="x") is False  # logged, never raised


def test_notify_rejects_bad_field_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with pytest.raises(ValueError, match="ready"):
        notify(ready=1)
    with pytest.raises(ValueError, match="at least one field"):
        notify()
    with pytest.raises(ValueError, match="must be > 0"):
        sdnotify.extend_timeout(0)


def test_unsupported_notify_socket_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify(READY=1) is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        (None, None, None),
        ("junk", None, None),
        ("0", None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec, pid, expected) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", {"self": str(os.getpid()), "other": "1", None: None}[pid])):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert watchdog_interval_s() == expected


async def test_watchdog_pings_while_healthy_and_stops_when_not(notify_path_receiver, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path_receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s -> ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    healthy = True
    dog = Watchdog.start(lambda: healthy)
    assert dog.enabled and dog.interval_s == pytest.approx(0.05)
    await asyncio.sleep(0.4)
    pings_healthy = len([m for _, m in notify_path_receiver.snapshot() if m.get("WATCHDOG") == "1"])
    assert pings_healthy >= 4

    healthy = False  # e.g. runner supervision stopped making progress
    await asyncio.sleep(0.1)  # let an in-flight ping land
    before = len(notify_path_receiver.snapshot())
    await asyncio.sleep(0.4)
    assert len(notify_path_receiver.snapshot()) == before, "pinged while the health check failed"
    assert dog.withheld >= 4

    healthy = True
    await asyncio.sleep(0.2)
    assert len(notify_path_receiver.snapshot()) > before, "did not resume once healthy again"
    await dog.stop()
    assert not dog.enabled
    after_stop = len(notify_path_receiver.snapshot())
    await asyncio.sleep(0.2)
    assert len(notify_path_receiver.snapshot()) == after_stop


async def test_watchdog_stops_when_the_loop_is_blocked(notify_path_receiver, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path_receiver.address)
    dog = Watchdog.start(lambda: True, interval_s=0.05)
    await asyncio.sleep(0.3)
    time.sleep(0.6)  # a handler that blocks the event loop
    blocked_until = time.monotonic()
    await asyncio.sleep(0.2)
    dog.stop()  # not awaited: must be harmless too
    times = [t for t, m in notify_path_receiver.snapshot() if m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) >= 0.55, f"pings continued while the loop was blocked: {gaps}"
    assert any(t >= blocked_until for t in times), "pings did not resume after the loop unblocked"


async def test_watchdog_treats_a_raising_check_as_unhealthy(notify_path_receiver, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path_receiver.address)

    def broken() -> bool:
        raise RuntimeError("supervisor state unreadable")

    dog = Watchdog.start(broken, interval_s=0.02)
    await asyncio.sleep(0.15)
    await dog.stop()
    assert notify_path_receiver.snapshot() == []
    assert dog.withheld >= 3


async def test_watchdog_without_systemd_is_inert(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = Watchdog.start(lambda: True)
    assert not dog.enabled and dog.interval_s is None
    await dog.stop()
    with pytest.raises(ValueError, match="interval_s"):
        Watchdog.start(lambda: True, interval_s=0)


async def test_heartbeat_as_the_health_check(notify_path_receiver, monkeypatch) -> None:
    """The daemon's wiring: supervision beats, the watchdog pings only while beats are fresh."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path_receiver.address)
    heart = sdnotify.Heartbeat(max_age_s=0.1)

    async def supervision(rounds: int) -> None:
        for _ in range(rounds):
            heart.beat()
            await asyncio.sleep(0.02)

    dog = Watchdog.start(heart, interval_s=0.02)
    await supervision(10)  # 0.2 s of progress
    pinged = len(notify_path_receiver.snapshot())
    assert pinged >= 5
    await asyncio.sleep(0.3)  # supervision stuck: no beats
    stale = len(notify_path_receiver.snapshot())
    assert stale - pinged <= 6, "kept pinging long after the beats stopped"
    await asyncio.sleep(0.1)
    assert len(notify_path_receiver.snapshot()) == stale
    await dog.stop()
    with pytest.raises(ValueError, match="max_age_s"):
        sdnotify.Heartbeat(0)
