"""G.711 (ITU-T): 8-bit µ-law and A-law telephone samples, as the Realtime API's ``audio/pcmu``
and ``audio/pcma`` carry them at 8 kHz.

The server decodes them (``runtime/realtime.py``); the toy world encodes its telephone speech
(``export/toy/world.py``) and the tests encode what they send, so coder and decoder share these
tables. The tables equal Python's ``audioop`` expansion (tested).
"""

from __future__ import annotations

import numpy as np


def ulaw_table() -> np.ndarray:
    """Each µ-law code's 16-bit linear value."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def alaw_table() -> np.ndarray:
    """Each A-law code's 16-bit linear value."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


TABLES = {"audio/pcmu": ulaw_table(), "audio/pcma": alaw_table()}


def decode(data: bytes, fmt: str) -> np.ndarray:
    """``audio/pcmu`` or ``audio/pcma`` bytes -> int16 samples."""
    return TABLES[fmt][np.frombuffer(data, np.uint8)]


def encode(samples: np.ndarray, fmt: str) -> bytes:
    """int16 samples -> ``audio/pcmu`` or ``audio/pcma`` bytes: for each sample the code whose
    value is nearest (ties to the lower value)."""
    table = TABLES[fmt].astype(np.int32)
    order = np.argsort(table, kind="stable")
    x = np.asarray(samples, np.int32)
    idx = np.clip(np.searchsorted(table[order], x), 1, table.size - 1)
    nearer = np.where(np.abs(table[order][idx - 1] - x) <= np.abs(table[order][idx] - x), idx - 1, idx)
    return order[nearer].astype(np.uint8).tobytes()
