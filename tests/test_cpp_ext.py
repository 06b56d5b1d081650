"""The compiled extension is built by the package build and agrees with numpy."""

import numpy as np
import pytest

from mdl_edge import _mel
from mdl_edge.runtime.mel import hann_window

from conftest import assert_close


@pytest.mark.parametrize("n", [1, 2, 7, 400, 512, 1024])
def test_hann_periodic_matches_numpy(n: int) -> None:
    got = _mel.hann_periodic(n)
    assert got.dtype == np.float32 and got.shape == (n,)
    expected = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    assert_close(got, expected, atol=6e-8, what=f"hann({n})")


def test_hann_512_is_the_front_end_window() -> None:
    assert_close(_mel.hann_periodic(512), hann_window(), atol=6e-8, what="hann(512)")


@pytest.mark.parametrize("n", [0, -3])
def test_bad_length_raises_value_error(n: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        _mel.hann_periodic(n)
