"""Helpers shared by the fuzz tests: how many examples to run, and a way to run one property
at two sizes (the CI size in the default run, a bigger one behind the ``slow`` marker)."""

from __future__ import annotations

import os
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# LASTMILE_FUZZ_SCALE multiplies every example count (e.g. 10 for a long local run).
SCALE = float(os.environ.get("LASTMILE_FUZZ_SCALE", "1"))
LONG = 20  # how much bigger the ``slow`` run of each property is


def examples(base: int, scale: float = 1) -> int:
    return max(1, int(base * scale * SCALE))


def run_property(prop: Callable[..., Any], strategy: st.SearchStrategy[Any], max_examples: int) -> None:
    """Run ``prop(value)`` for ``max_examples`` values drawn from ``strategy``.

    Built at call time so one property can run at the CI size and at the long size from a
    parametrized test; ``database=None`` keeps runs independent of earlier ones (a failure is
    printed with its minimal example, which is what a regression test is written from).
    """
    runner = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )(given(strategy)(prop))
    runner()
