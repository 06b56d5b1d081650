"""Handing freed heap memory back after the stages that allocate a lot (runtime/heap.py)."""

from __future__ import annotations

import sys

import pytest

from mdl_edge.runtime import heap


def test_trims_only_after_the_resident_set_grew(monkeypatch) -> None:
    calls: list[int] = []
    resident = [500 << 20]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: (lambda pad: calls.append(pad) or 1))
    monkeypatch.setattr(heap, "resident_bytes", lambda: resident[0])
    monkeypatch.setattr(heap, "_after_last_trim", 0)
    assert heap.release_freed_memory() and calls == [0]  # first call: grown from nothing
    resident[0] += heap.TRIM_AFTER_GROWTH - 1
    assert not heap.release_freed_memory() and calls == [0]  # too little since the last trim
    resident[0] += 1
    assert heap.release_freed_memory() and calls == [0, 0]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)  # no glibc: nothing to do
    resident[0] += 1 << 30
    assert not heap.release_freed_memory()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and calls glibc")
def test_real_trim_returns_freed_pages() -> None:
    """On this Linux, glibc's malloc_trim is found and a freed, fragmented heap shrinks."""
    import numpy as np

    if heap._malloc_trim() is None:
        pytest.skip("not glibc")
    assert heap.resident_bytes() > 0
    # blocks under glibc's mmap threshold (128 kB), a survivor between each pair: the heap
    # cannot shrink from its top
    blocks = [np.ones(25_000, np.float32) for _ in range(2000)]
    keep = blocks[1::2]
    del blocks
    before = heap.resident_bytes()
    heap._after_last_trim = 0
    assert heap.release_freed_memory()
    freed = before - heap.resident_bytes()
    assert freed > 40 << 20, f"only {freed / 1e6:.1f} MB returned of ~100 MB freed"
    del keep
