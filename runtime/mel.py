"""Log-mel front end of MiDashengLM (spec §1): filterbank, window and a readable numpy reference.

The numpy implementation here is the executable specification: float64 throughout, no torch.
Fast paths (the C++ extension) are tested against it.
"""

from __future__ import annotations

import numpy as np

from . import constants as C
from .errors import AudioError
from .options import resolve_threads


def hann_window() -> np.ndarray:
    """Periodic Hann window of 512 samples (``torch.hann_window(512)``), float64."""
    n = np.arange(C.WIN_LENGTH, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / C.WIN_LENGTH)


def mel_filterbank() -> np.ndarray:
    """HTK mel filterbank ``[257, 64]``, 0-8000 Hz, triangles without area normalisation, float64.

    Equals ``torchaudio.functional.melscale_fbanks(257, 0, 8000, 64, 16000, norm=None, mel_scale="htk")``.
    """
    all_freqs = np.linspace(0.0, C.SAMPLE_RATE / 2, C.N_FREQS)

    def hz_to_mel(f: float) -> float:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    m_pts = np.linspace(hz_to_mel(C.F_MIN), hz_to_mel(C.F_MAX), C.N_MELS + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]  # [n_mels + 1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even) and return them as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def front_end_buffers(*, bf16_buffers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(window [512], filterbank [257, 64])`` as float32 values, the buffers of the fp32 reference;
    with ``bf16_buffers`` rounded to bfloat16 as bf16 deployments hold them (spec §1.5)."""
    window, fb = hann_window().astype(np.float32), mel_filterbank().astype(np.float32)
    if bf16_buffers:
        window, fb = bf16_round(window), bf16_round(fb)
    return window, fb


def pad_to_min_length(wave: np.ndarray) -> np.ndarray:
    """Zero-pad clips shorter than 3200 samples (0.2 s) to exactly 3200, as the reference does."""
    if wave.shape[-1] >= C.MIN_SAMPLES:
        return wave
    return np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, C.MIN_SAMPLES - wave.shape[-1])])


def check_wave(wave: np.ndarray, *, name: str = "audio") -> np.ndarray:
    """Validate a mono waveform: 1-D, non-empty, finite. Returns it as a contiguous float32 array."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D mono waveform, got shape {wave.shape}")
    if wave.size == 0:
        raise AudioError(f"{name}: the clip is empty (0 samples)")
    if not np.issubdtype(wave.dtype, np.floating):
        raise AudioError(f"{name}: expected float samples, got dtype {wave.dtype}")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if not np.isfinite(wave).all():
        bad = int(np.count_nonzero(~np.isfinite(wave)))
        raise AudioError(f"{name}: {bad} of {wave.size} samples are NaN or infinite")
    return wave


def log_mel_numpy(wave: np.ndarray, *, bf16_buffers: bool = False) -> np.ndarray:
    """Reference log-mel ``[64, 1 + L // 160]`` (float32) of a 16 kHz mono clip, in float64 math.

    Reflect centre padding, periodic Hann, |rfft|^2, HTK mel, ``10 log10(max(x, 1e-10))``,
    per-clip top_db 120; clips shorter than 3200 samples are zero-padded first. Window and
    filterbank are the float32 buffers of :func:`front_end_buffers`; the arithmetic is float64.
    """
    wave = pad_to_min_length(check_wave(wave)).astype(np.float64)
    window, fb = (b.astype(np.float64) for b in front_end_buffers(bf16_buffers=bf16_buffers))
    half = C.N_FFT // 2
    padded = np.pad(wave, (half, half), mode="reflect")
    n = C.n_frames(wave.size)
    idx = np.arange(C.N_FFT)[None, :] + C.HOP_LENGTH * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(padded[idx] * window, n=C.N_FFT, axis=-1)) ** 2  # [T, 257]
    db = 10.0 * np.log10(np.maximum(spec @ fb, C.LOG_FLOOR))
    db = np.maximum(db, db.max() - C.TOP_DB)
    return db.T.astype(np.float32)


def log_mel(wave: np.ndarray, *, bf16_buffers: bool = False, n_threads: int | None = None) -> np.ndarray:
    """The exact log-mel ``[64, 1 + max(L, 3200) // 160]`` of a 16 kHz mono clip (C++ extension).

    Same definition as :func:`log_mel_numpy`; float32 input is read without a copy and frames
    are computed in parallel over ``n_threads`` (default: all available cores) with the GIL
    released. Raises :class:`AudioError` for empty or non-finite input.
    """
    from .. import _mel

    wave = np.asarray(wave)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
        check_wave(wave)  # raises the descriptive AudioError
    try:
        return _mel.log_mel(wave, bf16_buffers=bf16_buffers, n_threads=resolve_threads(n_threads))
    except ValueError as e:
        raise AudioError(f"audio: {e}") from e


class LogMelStream:
    """Log-mel of audio that arrives in blocks, identical to :func:`log_mel` of the whole clip.

    ``feed(block)`` returns the dB frames ``[64, k]`` that the samples so far complete (before
    top_db, which needs the clip's global maximum); ``finish()`` returns the rest. Memory is the
    output plus one block. :func:`log_mel_blocks` applies top_db at the end.
    """

    _HALF = C.N_FFT // 2

    def __init__(self, *, bf16_buffers: bool = False, n_threads: int | None = None) -> None:
        self.bf16_buffers = bf16_buffers
        self.n_threads = resolve_threads(n_threads)
        self.n_samples = 0  # samples fed so far
        self.n_frames_done = 0
        self.peak = -np.inf
        self._buf = np.zeros(0, np.float32)  # padded-signal samples from frame n_frames_done on
        self._started = False
        self._finished = False

    def _frames(self, padded: np.ndarray, n: int) -> np.ndarray:
        from .. import _mel

        db, peak = _mel.raw_db_frames(padded, n, bf16_buffers=self.bf16_buffers, n_threads=self.n_threads)
        self.peak = max(self.peak, peak)
        self.n_frames_done += n
        return db

    def feed(self, block: np.ndarray) -> np.ndarray:
        """Add samples; return the newly completed frames ``[64, k]`` (raw dB)."""
        if self._finished:
            raise RuntimeError("LogMelStream.feed after finish()")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise AudioError(f"audio block: expected 1-D samples, got shape {block.shape}")
        if not np.isfinite(block).all():
            raise AudioError(f"audio: {int(np.count_nonzero(~np.isfinite(block)))} samples near sample {self.n_samples} are NaN or infinite")
        self.n_samples += block.size
        self._buf = np.concatenate([self._buf, block])
        if not self._started:
            # The start needs samples 1..256 for its reflection; until then, wait.
            if self._buf.size <= self._HALF:
                return np.zeros((C.N_MELS, 0), np.float32)
            self._buf = np.concatenate([self._buf[1 : self._HALF + 1][::-1], self._buf])
            self._started = True
        n = (self._buf.size - C.N_FFT) // C.HOP_LENGTH + 1 if self._buf.size >= C.N_FFT else 0
        if n <= 0:
            return np.zeros((C.N_MELS, 0), np.float32)
        db = self._frames(self._buf, n)
        self._buf = self._buf[n * C.HOP_LENGTH :]
        return db

    def finish(self) -> np.ndarray:
        """Pad the end (3200-sample minimum, reflection) and return the remaining frames."""
        if self._finished:
            raise RuntimeError("LogMelStream.finish called twice")
        self._finished = True
        if self.n_samples == 0:
            raise AudioError("audio: the clip is empty (0 samples)")
        total = max(self.n_samples, C.MIN_SAMPLES)
        if total > self.n_samples:
            self._buf = np.concatenate([self._buf, np.zeros(total - self.n_samples, np.float32)])
        if not self._started:
            self._buf = np.concatenate([self._buf[1 : self._HALF + 1][::-1], self._buf])
            self._started = True
        # reflection of the last 256 samples, edge sample not repeated
        self._buf = np.concatenate([self._buf, self._buf[-self._HALF - 1 : -1][::-1]])
        n = C.n_frames(total) - self.n_frames_done
        return self._frames(self._buf, n)


def log_mel_blocks(blocks, *, expected_samples: int | None = None, bf16_buffers: bool = False, n_threads: int | None = None) -> np.ndarray:
    """:func:`log_mel` of the concatenation of ``blocks`` (an iterable of 1-D float arrays),
    computed block by block: equal to the one-shot result, without holding the whole waveform.

    Frames are written into one output array sized from ``expected_samples`` (e.g. from the
    file header) and grown by half when the guess is short, so peak memory stays near the size
    of the output plus one block. The result may be a column slice (not C-contiguous) of that
    array.
    """
    stream = LogMelStream(bf16_buffers=bf16_buffers, n_threads=n_threads)
    cap = C.n_frames(expected_samples) + 8 if expected_samples else 1024
    out = np.empty((C.N_MELS, cap), np.float32)
    n = 0

    def put(db: np.ndarray) -> None:
        nonlocal out, n
        k = db.shape[1]
        if n + k > out.shape[1]:
            grown = np.empty((C.N_MELS, max(n + k, out.shape[1] * 3 // 2)), np.float32)
            grown[:, :n] = out[:, :n]
            out = grown
        out[:, n : n + k] = db
        n += k

    for block in blocks:
        put(stream.feed(block))
    put(stream.finish())
    out = out[:, :n]  # a view when the guess was long: no second copy of a large output
    np.maximum(out, np.float32(float(stream.peak) - C.TOP_DB), out=out)
    return out
