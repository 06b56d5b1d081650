"""The token-count chain of spec §3.1, by the formula and against the reference model."""

import pytest

from mdl_edge.runtime import constants as C


@pytest.mark.parametrize(
    "samples,frames,patches,tokens",
    [(3200, 21, 5, 1), (16000, 101, 25, 5), (80000, 501, 125, 25), (160000, 1001, 250, 50), (480000, 3001, 750, 150), (960000, 6001, 1500, 300)],
)
def test_spec_table(samples: int, frames: int, patches: int, tokens: int) -> None:
    assert C.n_frames(samples) == frames
    assert C.n_patches(samples) == patches
    assert C.n_audio_tokens(samples) == tokens


def _samples_for_frames(frames: int) -> list[int]:
    # every L with 1 + L // 160 == frames: the first, the last, and one inside
    lo = (frames - 1) * C.HOP_LENGTH
    return [lo, lo + 80, lo + C.HOP_LENGTH - 1]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_chunk_boundaries(k: int, delta: int) -> None:
    frames = k * C.CHUNK_FRAMES + delta
    for L in _samples_for_frames(frames):
        assert C.n_audio_tokens(L) == ((1 + L // 160) // 4) // 5
        assert C.n_patches(L) == (1 + L // 160) // 4


def test_short_clips_count_as_padded() -> None:
    for L in (1, 255, 256, 3199):
        assert C.n_audio_tokens(L) == 1


def test_key_mask_rule_is_one_short_when_frames_mod_4_is_3() -> None:
    # spec §2.6: L = 16 480 ... 16 639 -> floor(L/160) = 103 -> 104 frames -> 26 patches, but floor(L/640) = 25
    for L in (16480, 16639):
        assert C.n_patches(L) == 26 and C.n_valid_keys(L) == 25
    assert C.n_valid_keys(16000) == C.n_patches(16000) == 25


def test_chain_constants() -> None:
    assert (C.FRAMES_PER_SECOND, C.PATCHES_PER_SECOND, C.TOKENS_PER_SECOND, C.CHUNK_PATCHES) == (100, 25, 5, 252)
