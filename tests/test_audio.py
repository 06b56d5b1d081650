"""Audio loading into mono float32 16 kHz."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from mdl_edge.runtime.audio import load_audio
from mdl_edge.runtime.errors import AudioError


def _sine(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * 16000 / x.size)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampled_to_16k_keeps_frequency(tmp_path, sr: int) -> None:
    path = tmp_path / "s.wav"
    sf.write(path, _sine(1000, sr), sr)
    x = load_audio(path)
    assert x.dtype == np.float32 and abs(x.size - 16000) <= 1
    assert abs(_peak_hz(x) - 1000) < 2


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_stereo_pcm_to_mono(tmp_path, subtype: str) -> None:
    left, right = _sine(440, 16000), _sine(880, 16000) * 0.5
    path = tmp_path / "st.flac" if subtype == "PCM_16" else tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype=subtype)
    x = load_audio(path)
    assert np.abs(x - (left + right) / 2).max() < 1e-3


def test_bytes_file_object_and_array() -> None:
    buf = io.BytesIO()
    sf.write(buf, _sine(500, 16000), 16000, format="WAV")
    a = load_audio(buf.getvalue())
    buf.seek(0)
    b = load_audio(buf)
    c = load_audio((_sine(500, 16000) * 32767).astype(np.int16), sample_rate=16000)
    assert np.abs(a - b).max() == 0 and np.abs(a - c).max() < 1e-4


@pytest.mark.parametrize(
    "source,kwargs,match",
    [
        (b"not audio at all", {}, "cannot decode audio"),
        (np.zeros(100, np.float32), {}, "pass sample_rate"),
        (np.zeros(0, np.float32), {"sample_rate": 16000}, "empty"),
        (np.full(100, np.nan, np.float32), {"sample_rate": 16000}, "NaN"),
        ("/no/such/file.wav", {}, "no such file"),
    ],
)
def test_bad_input(source, kwargs, match) -> None:
    with pytest.raises(AudioError, match=match):
        load_audio(source, **kwargs)
