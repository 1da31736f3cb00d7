"""The ``[memory]`` keys, their defaults and the rules between them (each key's own type and
range is checked by the config schema in ``lastmile.appliance.server.config``)."""

from __future__ import annotations

from typing import Any

PLANS = ("refuse", "auto")

DEFAULTS: dict[str, Any] = {
    "host_limit_mb": 0,
    "host_limit_fraction": 0.8,
    "device_limit_mb": 0,
    "device_limit_fraction": 0.9,
    "high_watermark": 0.9,
    "low_watermark": 0.8,
    "plan": "refuse",
    "evict_idle": False,
    "sample_interval_s": 0.5,
    "pool_idle_s": 30.0,
}


def check_memory_config(values: dict[str, Any]) -> None:
    """Cross-key rules; ValueError starting with the key's name."""
    if values["low_watermark"] >= values["high_watermark"]:
        raise ValueError(f"low_watermark: {values['low_watermark']} must be below high_watermark ({values['high_watermark']})")
    if values["plan"] not in PLANS:
        raise ValueError(f"plan: got {values['plan']!r}; allowed: {', '.join(PLANS)}")
