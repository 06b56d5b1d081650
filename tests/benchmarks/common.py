"""Shared helpers of the benchmark scripts (run as `python tests/benchmarks/bench_*.py`)."""

from __future__ import annotations

import time
from typing import Callable


def best_of(fn: Callable[[], object], repeats: int, *, warmup: bool = False) -> float:
    """Best wall time of ``repeats`` calls (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
