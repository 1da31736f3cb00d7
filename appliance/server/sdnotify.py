"""sd_notify(3) and the service watchdog, without libsystemd.

Why our own: the protocol is one datagram of ``KEY=VALUE`` lines to the
AF_UNIX socket named by ``$NOTIFY_SOCKET``; a dependency (and a C library on
every edge box) for twenty lines is not worth it, and writing it here lets
the tests capture the datagrams on a real socket.

Everything here is a no-op without systemd: :func:`notify` returns False
when ``$NOTIFY_SOCKET`` is unset and :meth:`Watchdog.start` returns a
watchdog that never pings when ``$WATCHDOG_USEC`` is unset, so the daemon
calls them unconditionally and runs the same in the foreground.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable

__all__ = [
    "notify",
    "ready",
    "status",
    "stopping",
    "extend_timeout",
    "watchdog_interval_s",
    "Watchdog",
    "Heartbeat",
]

log = logging.getLogger("lastmile.sdnotify")

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")
_warned_sockets: set[str] = set()


def _address(raw: str) -> str | bytes:
    """Map ``$NOTIFY_SOCKET`` to a ``sendto`` address (``@`` = abstract namespace)."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    raise ValueError(
        f"NOTIFY_SOCKET={raw!r} is neither an absolute path nor an abstract "
        "socket ('@name'); vsock and other forms are not supported"
    )


def _encode(fields: dict[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(
                f"sd_notify field {key!r} is not a valid name "
                "(upper-case letters, digits and '_', e.g. READY, STATUS)"
            )
        if isinstance(value, bool):
            value = int(value)
        text = str(value)
        # STATUS= carries free text (often an exception message); a newline
        # would start a new field, so fold it instead of failing the caller.
        text = text.replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    if not lines:
        raise ValueError("notify() needs at least one field, e.g. READY=1")
    return ("\n".join(lines) + "\n").encode()


def notify(**fields: object) -> bool:
    """Send one sd_notify datagram, e.g. ``notify(READY=1, STATUS="serving")``.

    Returns True when a datagram was sent, False when there is no
    ``$NOTIFY_SOCKET`` (not under systemd) or sending failed. A send failure
    is logged once per socket and never raised: losing a status line must
    not take the daemon down (a missed WATCHDOG=1 is what systemd acts on).
    Invalid field names raise ValueError (a programming error).
    """
    payload = _encode(fields)
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        addr = _address(raw)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, addr)
    except (OSError, ValueError) as exc:
        if raw not in _warned_sockets:
            _warned_sockets.add(raw)
            log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1 (plus STATUS=): the socket serves and restored models are up."""
    fields: dict[str, object] = {"READY": 1}
    if status_text is not None:
        fields["STATUS"] = status_text
    return notify(**fields)


def status(text: str) -> bool:
    """STATUS=<text>: one line shown by ``systemctl status lastmile``."""
    return notify(STATUS=text)


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun (stop timeout starts counting)."""
    fields: dict[str, object] = {"STOPPING": 1}
    if status_text is not None:
        fields["STATUS"] = status_text
    return notify(**fields)


def extend_timeout(seconds: float, status_text: str | None = None) -> bool:
    """EXTEND_TIMEOUT_USEC: ask for ``seconds`` more before systemd gives up.

    Send it before each long step of start-up (restoring a big model) and
    again before the extension runs out; it applies while starting (beyond
    TimeoutStartSec) and while stopping.
    """
    if not seconds > 0:
        raise ValueError(f"extend_timeout seconds must be > 0, got {seconds!r}")
    fields: dict[str, object] = {"EXTEND_TIMEOUT_USEC": int(seconds * 1_000_000)}
    if status_text is not None:
        fields["STATUS"] = status_text
    return notify(**fields)


def watchdog_interval_s() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked for.

    Half of ``$WATCHDOG_USEC`` (the margin sd_watchdog_enabled(3)
    recommends), only when ``$WATCHDOG_PID`` is unset or is this process —
    a runner child that inherited the variables must not ping.
    """
    raw = os.environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a process id", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: must be > 0", raw)
        return None
    return usec / 2 / 1_000_000


class Heartbeat:
    """A health check for :class:`Watchdog`: "was there progress in the last N seconds?".

    The supervised loop (e.g. the runner supervision task) calls :meth:`beat`
    each round; the watchdog calls the object. If the loop stalls, or dies
    without anyone noticing, the beats stop and so do the WATCHDOG=1 pings.
    """

    def __init__(self, max_age_s: float) -> None:
        if not max_age_s > 0:
            raise ValueError(f"Heartbeat max_age_s must be > 0, got {max_age_s!r}")
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self._last

    def __call__(self) -> bool:
        return self.age_s <= self.max_age_s


class Watchdog:
    """Pings WATCHDOG=1 from an asyncio task while the daemon is healthy.

    The task runs on the daemon's event loop, so a blocked loop stops the
    pings by itself; ``health_check`` covers what the loop can't see (the
    daemon passes "the runner supervision made progress recently"). When a
    check fails or raises, the ping is withheld and systemd restarts the
    service once ``WatchdogSec`` passes without one.

    Create it with :meth:`start` from inside the running loop; without a
    systemd watchdog it is inert (``enabled`` is False) but safe to stop.
    """

    def __init__(
        self,
        health_check: Callable[[], bool],
        interval_s: float | None,
        send: Callable[..., bool] = notify,
    ) -> None:
        self.health_check = health_check
        self.interval_s = interval_s
        self._send = send
        self._task: asyncio.Task[None] | None = None
        self.pings = 0
        self.withheld = 0
        self.last_ping_monotonic: float | None = None

    @classmethod
    def start(
        cls,
        health_check: Callable[[], bool],
        interval_s: float | None = None,
        *,
        send: Callable[..., bool] = notify,
    ) -> Watchdog:
        """Start pinging on the running loop; ``interval_s`` defaults to the env.

        Must be called with a running event loop (from async code).
        """
        if interval_s is None:
            interval_s = watchdog_interval_s()
        elif not interval_s > 0:
            raise ValueError(f"watchdog interval_s must be > 0, got {interval_s!r}")
        dog = cls(health_check, interval_s, send)
        if interval_s is not None:
            dog._task = asyncio.get_running_loop().create_task(
                dog._run(), name="lastmile-watchdog"
            )
            log.info("systemd watchdog: pinging every %.1f s", interval_s)
        return dog

    @property
    def enabled(self) -> bool:
        return self._task is not None and not self._task.done()

    def _healthy(self) -> bool:
        try:
            return bool(self.health_check())
        except Exception:  # a broken check is an unhealthy daemon
            log.exception("watchdog health check raised; withholding WATCHDOG=1")
            return False

    async def _run(self) -> None:
        assert self.interval_s is not None
        was_healthy = True
        while True:
            if self._healthy():
                if not was_healthy:
                    log.warning("watchdog health check passes again; resuming pings")
                was_healthy = True
                self._send(WATCHDOG=1)
                self.pings += 1
                self.last_ping_monotonic = time.monotonic()
            else:
                if was_healthy:
                    log.error(
                        "watchdog health check failed; withholding WATCHDOG=1 "
                        "(systemd restarts the service if this persists)"
                    )
                was_healthy = False
                self.withheld += 1
            await asyncio.sleep(self.interval_s)

    def stop(self) -> _Stopped:
        """Stop pinging (before STOPPING=1 / on shutdown). Idempotent.

        Cancels at once; the result may be awaited (``await dog.stop()``) to
        wait until the task has finished, or ignored.
        """
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        return _Stopped(task)


class _Stopped:
    """Awaitable returned by :meth:`Watchdog.stop`; harmless when not awaited."""

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self._task = task

    def __await__(self):  # type: ignore[no-untyped-def]
        if self._task is not None:
            yield from asyncio.gather(self._task, return_exceptions=True).__await__()
