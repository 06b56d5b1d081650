"""The reference front end against torch.stft and the spec's formulas, and the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdl_edge.export.reference.mel import LogMel, batch_log_mel
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.errors import AudioError
from mdl_edge.runtime.mel import bf16_round, front_end_buffers, log_mel_numpy, mel_filterbank

from conftest import assert_close

SR = C.SAMPLE_RATE


def spec_filterbank_float64() -> np.ndarray:
    """Spec §1.3 written out triangle by triangle (independent of the vectorised runtime code)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    m = np.linspace(mel(0.0), mel(8000.0), 66)
    f_pts = 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_k = np.linspace(0, 8000, 257)
    fb = np.zeros((257, 64))
    for j in range(64):
        for k in range(257):
            down = (f_k[k] - f_pts[j]) / (f_pts[j + 1] - f_pts[j])
            up = (f_pts[j + 2] - f_k[k]) / (f_pts[j + 2] - f_pts[j + 1])
            fb[k, j] = max(0.0, min(down, up))
    return fb


def stft_log_mel(wave: np.ndarray, *, bf16_buffers: bool = False) -> np.ndarray:
    """torch.stft in float64 + the spec's dB formula with per-clip top_db.

    Window and filterbank are float32 values, as the buffers of the fp32 reference are: the
    spec's formulas correctly rounded (torch.hann_window's own float32 arithmetic is a few ulp
    off, which moves bins 100 dB below the peak by 0.01 dB; test_window_matches_torch bounds it).
    """
    x = torch.from_numpy(wave.astype(np.float64))
    if x.numel() < C.MIN_SAMPLES:
        x = torch.nn.functional.pad(x, (0, C.MIN_SAMPLES - x.numel()))
    window = torch.from_numpy(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)).float().double()
    fb = torch.from_numpy(spec_filterbank_float64()).float().double()
    if bf16_buffers:
        window, fb = window.to(torch.bfloat16).double(), fb.to(torch.bfloat16).double()
    spec = torch.stft(x, n_fft=512, hop_length=160, win_length=512, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs() ** 2  # [257, T]
    db = 10 * torch.log10(torch.clamp(fb.T @ power, min=1e-10))
    db = torch.maximum(db, db.max() - 120.0)
    return db.numpy()


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    sq = np.sign(np.sin(2 * np.pi * 440 * t)) * 1.2
    return {
        "silence": np.zeros(SR, np.float32),
        "white_noise": (rng.standard_normal(2 * SR) * 0.3).astype(np.float32),
        **{f"sine_{f}": (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32) for f in (50, 1000, 7900)},
        "clipped_square": np.clip(sq, -1, 1).astype(np.float32),
        "loud": (rng.standard_normal(SR) * 30).astype(np.float32),
    }


def test_window_matches_torch() -> None:
    window, _ = front_end_buffers()
    assert_close(window, torch.hann_window(512), atol=3e-7, what="periodic Hann vs torch.hann_window")


def test_filterbank_matches_spec_formula() -> None:
    assert_close(mel_filterbank(), spec_filterbank_float64(), atol=1e-12, what="mel filterbank")


@pytest.mark.parametrize("name", list(signals()))
@pytest.mark.parametrize("bf16", [False, True])
def test_reference_front_end_matches_stft(name: str, bf16: bool) -> None:
    wave = signals()[name]
    got = LogMel(bf16_buffers=bf16)(torch.from_numpy(wave)[None])[0]
    assert_close(got, stft_log_mel(wave, bf16_buffers=bf16), atol=1e-3, what=f"reference log-mel of {name}")
    assert_close(log_mel_numpy(wave, bf16_buffers=bf16), stft_log_mel(wave, bf16_buffers=bf16), atol=1e-3, what=f"numpy log-mel of {name}")


@pytest.mark.parametrize("n", [1, 255, 256, 3199, 3200, 16000, 160640, 161119, 161120, 161279])
def test_lengths_and_min_padding(n: int) -> None:
    rng = np.random.default_rng(n)
    wave = (rng.standard_normal(n) * 0.1).astype(np.float32)
    mel, lengths = batch_log_mel(LogMel(), [wave])
    got = mel[0]
    expected_len = max(n, C.MIN_SAMPLES)
    assert int(lengths[0]) == expected_len
    assert got.shape == (64, C.n_frames(expected_len))
    assert_close(got, stft_log_mel(wave), atol=1e-3, what=f"log-mel of {n} samples")


def test_batch_items_are_computed_alone() -> None:
    """top_db per clip, reflect padding at each clip's own end: batching changes nothing."""
    loud = (np.random.default_rng(1).standard_normal(SR) * 10).astype(np.float32)
    quiet = loud[: SR // 2] * 1e-4
    mel, lengths = batch_log_mel(LogMel(), [loud, quiet])
    assert lengths.tolist() == [SR, SR // 2]
    for i, w in enumerate([loud, quiet]):
        t = C.n_frames(w.size)
        assert_close(mel[i, :, :t], stft_log_mel(w), atol=1e-3, what=f"batch item {i}")
        assert (mel[i, :, t:] == 0).all()


def test_bf16_round_matches_torch() -> None:
    x = np.random.default_rng(2).standard_normal(10000).astype(np.float32) * 1e3
    assert np.array_equal(bf16_round(x), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize(
    "wave,match",
    [(np.zeros(0, np.float32), "empty"), (np.array([0.0, np.nan] * 2000, np.float32), "NaN"), (np.zeros((2, 4000), np.float32), "1-D")],
)
def test_bad_waves_are_refused(wave: np.ndarray, match: str) -> None:
    with pytest.raises(AudioError, match=match):
        batch_log_mel(LogMel(), [wave])
    with pytest.raises(AudioError, match=match):
        log_mel_numpy(wave)
