"""One convention for sizes in everything an operator reads (CLI and TUI): binary units,
labelled as such (KiB, MiB, GiB: 1 MiB = 1024 x 1024 bytes, what ``memory_limit_mb`` means
too). The API speaks bytes; only human output goes through here."""

from __future__ import annotations

MIB = 1024 * 1024
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(value: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` -> ``-`` (no figure)."""
    if value is None:
        return "-"
    value = float(value)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_mib(value: float | None) -> str:
    """Bytes as MiB with the unit, for columns that compare models (same unit on every row)."""
    return "-" if value is None else f"{value / MIB:.1f} MiB"


def fmt_percent(part: float | None, whole: float | None) -> str:
    """An error rate: ``3 / 10`` -> ``30.0%``; no requests -> ``-``."""
    if not whole or part is None:
        return "-"
    return f"{100.0 * part / whole:.1f}%"
