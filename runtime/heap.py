"""Handing freed memory back to the operating system after the stages that allocate a lot.

ONNX Runtime runs without its arena (``runtime/onnx_meta.py``), so every tensor of a run is a
``malloc`` freed when the run ends. glibc keeps most of those blocks: they sit between live
ones, so its heap cannot shrink from the top, and the resident set creeps up from request to
request (measured on the 0.6B shapes: +100 MB after a 3 / 10 / 30 s series, all of it free
memory). ``malloc_trim(0)`` returns the free pages inside the heap and every thread's arena.
It costs 1-7 ms, so it runs only when the resident set has grown by :data:`TRIM_AFTER_GROWTH`
since the last trim. Off Linux's glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from typing import Any

# Growth of the resident set since the last trim that makes the next call trim.
TRIM_AFTER_GROWTH = 8 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_lock = threading.Lock()
_after_last_trim = 0


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_bytes() -> int:
    """This process's resident set now (Linux; 0 where unknown)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> bool:
    """After a stage that freed a lot: return the heap's free pages to the system if the
    resident set grew by :data:`TRIM_AFTER_GROWTH` since the last trim. Whether a trim ran."""
    global _after_last_trim
    trim = _malloc_trim()
    if trim is None:
        return False
    with _lock:
        if resident_bytes() - _after_last_trim < TRIM_AFTER_GROWTH:
            return False
        trim(0)
        _after_last_trim = resident_bytes()
    return True
