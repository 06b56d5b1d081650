"""Audio in: a path, bytes, file object or array -> mono float32 at 16 kHz.

Files are decoded with libsndfile (soundfile): WAV, FLAC, OGG/Vorbis/Opus, MP3. Channels are
averaged to mono (librosa's ``mono=True``), integer PCM arrives scaled to [-1, 1], and other
rates are resampled with soxr's high-quality filter (what librosa uses by default).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from . import constants as C
from .errors import AudioError

AudioSource = Union[str, Path, bytes, bytearray, BinaryIO, np.ndarray]


def describe(source: AudioSource) -> str:
    """A short name for an audio source, for error messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def to_mono_16k(samples: np.ndarray, sample_rate: int, *, name: str = "audio") -> np.ndarray:
    """``[n]`` or ``[n, channels]`` samples at ``sample_rate`` -> mono float32 at 16 kHz."""
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64)
    elif x.ndim != 1:
        raise AudioError(f"{name}: expected [samples] or [samples, channels], got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
    elif not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"{name}: unsupported sample dtype {x.dtype}")
    if x.size == 0:
        raise AudioError(f"{name}: the clip is empty (0 samples)")
    if not np.isfinite(x).all():
        raise AudioError(f"{name}: {int(np.count_nonzero(~np.isfinite(x)))} samples are NaN or infinite")
    x = x.astype(np.float32)
    if sample_rate != C.SAMPLE_RATE:
        if sample_rate <= 0:
            raise AudioError(f"{name}: invalid sample rate {sample_rate}")
        import soxr

        x = soxr.resample(x, sample_rate, C.SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(x)


def load_audio(source: AudioSource, *, sample_rate: int | None = None) -> np.ndarray:
    """Decode ``source`` to a mono float32 16 kHz waveform.

    Arrays must come with their ``sample_rate``; files carry their own. Raises
    :class:`~mdl_edge.runtime.errors.AudioError` naming the source on any problem.
    """
    name = describe(source)
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError(f"{name}: pass sample_rate= with an array (it is checked, not assumed)")
        return to_mono_16k(source, sample_rate, name=name)
    import soundfile as sf

    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise AudioError(f"{name}: no such file")
    f = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        data, sr = sf.read(f, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{name}: cannot decode audio: {e}") from e
    if sample_rate is not None and sample_rate != sr:
        raise AudioError(f"{name}: file is {sr} Hz but sample_rate={sample_rate} was given")
    return to_mono_16k(data, sr, name=name)


def demo_clip(seconds: float = 10.0, *, seed: int = 0) -> np.ndarray:
    """A generated 16 kHz test clip: a rising chirp, a two-tone 'bell', noise bursts and a
    syllable-like amplitude-modulated harmonic voice. Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * C.SAMPLE_RATE))
    t = np.arange(n) / C.SAMPLE_RATE
    chirp = 0.2 * np.sin(2 * np.pi * (200 * t + 300 * t**2 / max(seconds, 1e-3)))
    bell = 0.15 * (np.sin(2 * np.pi * 880 * t) + 0.5 * np.sin(2 * np.pi * 1320 * t)) * np.exp(-3 * (t % 2.0))
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / C.SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2 * 0.1
    bursts = rng.standard_normal(n) * 0.05 * ((t % 3.0) < 0.15)
    return (chirp + bell + voice + bursts).astype(np.float32)
