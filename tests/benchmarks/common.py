"""Shared helpers of the benchmark scripts (run as `python tests/benchmarks/bench_*.py`)."""

from __future__ import annotations

from mdl_edge.export.bench.machine import best_of, best_of_interleaved  # noqa: F401 (one timing rule for every benchmark)


