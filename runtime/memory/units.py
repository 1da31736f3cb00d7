"""Units of the memory room, in one place.

Everything inside the room and every API field is bytes (``..._bytes``). Two things are not:
the settings and config keys an operator types (``memory_limit_mb``, ``host_limit_mb``; their
"MB" is a mebibyte, 1024 x 1024 bytes), converted here by :func:`mib`, and human text (events,
error messages), written by :func:`human` as MiB or GiB.
"""

from __future__ import annotations

MiB = 1024 * 1024
GiB = 1024 * MiB


def mib(value: float | None) -> int | None:
    """Bytes of a ``..._mb`` setting (mebibytes); ``None``/0 (no limit) stays ``None``."""
    if not value:
        return None
    return int(value * MiB)


def human(n: float | None) -> str:
    """``12.3 MiB`` / ``1.50 GiB`` for messages (never "MB": the figures are binary)."""
    if n is None:
        return "unknown"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"
