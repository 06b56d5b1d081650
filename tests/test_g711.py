"""G.711 µ-law and A-law (``runtime/g711.py``): what the Realtime API's ``audio/pcmu`` and
``audio/pcma`` carry; the server decodes, the toy world's telephone speech and the tests encode."""

from __future__ import annotations

import numpy as np
import pytest

from mdl_edge.runtime.g711 import alaw_table, decode, encode, ulaw_table


def test_g711_tables_equal_audioop() -> None:
    audioop = pytest.importorskip("audioop")
    every = bytes(range(256))
    assert np.array_equal(ulaw_table(), np.frombuffer(audioop.ulaw2lin(every, 2), "<i2"))
    assert np.array_equal(alaw_table(), np.frombuffer(audioop.alaw2lin(every, 2), "<i2"))


def test_g711_encoder_picks_the_nearest_code() -> None:
    """``g711.encode`` (the toy world's telephone speech, the Realtime µ-law test) sends each sample
    as the code whose expansion is nearest: checked against every code by brute force."""
    x = np.random.default_rng(0).integers(-32768, 32768, 20000).astype(np.int16)
    for fmt, table in (("audio/pcmu", ulaw_table()), ("audio/pcma", alaw_table())):
        got = decode(encode(x, fmt), fmt).astype(np.int32)
        best = np.abs(table.astype(np.int32)[None, :] - x.astype(np.int32)[:, None]).min(axis=1)
        worst = int(np.abs(got - x).max())
        assert np.array_equal(np.abs(got - x), best), f"{fmt}: not the nearest code (largest error {worst})"
        assert np.array_equal(decode(encode(table, fmt), fmt), table), fmt
