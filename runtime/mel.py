"""Log-mel front ends of MiDashengLM: filterbanks, windows and a readable numpy reference.

Every encoder reads the 64-bin semantic mel (spec §1); DashengTokenizer-style encoders
(MiDashengLM-0.6B, spec §6.4) also read an acoustic mel of ``acoustic_mels`` bins on the same
frames. Where both are used they travel as one array: rows 0-63 semantic, the rest acoustic.

The numpy implementation here is the executable specification: float64 throughout, no torch.
Fast paths (the C++ extension) are tested against it.
"""

from __future__ import annotations

import copy

import numpy as np

from . import constants as C
from .errors import AudioError
from .options import resolve_threads


def hann_window(length: int = C.WIN_LENGTH) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window(length)``), float64; 512 for the semantic mel."""
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


def mel_filterbank(n_freqs: int = C.N_FREQS, n_mels: int = C.N_MELS) -> np.ndarray:
    """HTK mel filterbank ``[n_freqs, n_mels]``, 0-8000 Hz, triangles without area normalisation,
    float64; ``[257, 64]`` for the semantic mel, ``[513, acoustic_mels]`` for the acoustic one.

    Equals ``torchaudio.functional.melscale_fbanks(n_freqs, 0, 8000, n_mels, 16000, norm=None, mel_scale="htk")``.
    """
    all_freqs = np.linspace(0.0, C.SAMPLE_RATE / 2, n_freqs)

    def hz_to_mel(f: float) -> float:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    m_pts = np.linspace(hz_to_mel(C.F_MIN), hz_to_mel(C.F_MAX), n_mels + 2)
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


def front_end_buffers(*, acoustic_mels: int = 0, bf16_buffers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(window [512], filterbank [257, 64])`` of the semantic mel, or with ``acoustic_mels``
    ``(window [1024], filterbank [513, acoustic_mels])`` of the acoustic one, as float32 values,
    the buffers of the fp32 reference; with ``bf16_buffers`` rounded to bfloat16 as bf16
    deployments hold them (spec §1.5)."""
    if acoustic_mels:
        window, fb = hann_window(C.ACOUSTIC_N_FFT), mel_filterbank(C.ACOUSTIC_N_FREQS, acoustic_mels)
    else:
        window, fb = hann_window(), mel_filterbank()
    window, fb = window.astype(np.float32), fb.astype(np.float32)
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


def _log_mel_numpy_one(wave: np.ndarray, acoustic_mels: int, bf16_buffers: bool) -> np.ndarray:
    """One front end in float64: rows ``[n_mels, T]`` before top_db."""
    window, fb = (b.astype(np.float64) for b in front_end_buffers(acoustic_mels=acoustic_mels, bf16_buffers=bf16_buffers))
    n_fft = window.size
    padded = np.pad(wave, (n_fft // 2, n_fft // 2), mode="reflect")
    n = C.n_frames(wave.size)
    idx = np.arange(n_fft)[None, :] + C.HOP_LENGTH * np.arange(n)[:, None]
    mag = np.abs(np.fft.rfft(padded[idx] * window, n=n_fft, axis=-1))  # [T, n_fft / 2 + 1]
    if acoustic_mels:
        return np.log(np.maximum(mag @ fb, C.ACOUSTIC_LOG_FLOOR)).T
    return 10.0 * np.log10(np.maximum(mag**2 @ fb, C.LOG_FLOOR)).T


def log_mel_numpy(wave: np.ndarray, *, acoustic_mels: int = 0, bf16_buffers: bool = False) -> np.ndarray:
    """Reference log-mel ``[64 + acoustic_mels, 1 + L // 160]`` (float32) of a 16 kHz mono clip,
    in float64 math.

    Semantic rows: reflect centre padding, periodic Hann 512, |rfft|^2, HTK mel,
    ``10 log10(max(x, 1e-10))``, per-clip top_db 120. Acoustic rows (``acoustic_mels > 0``):
    reflect padding 512, periodic Hann 1024, |rfft|, HTK mel, ``ln(max(x, 1e-7))``. Clips
    shorter than 3200 samples are zero-padded first. Window and filterbank are the float32
    buffers of :func:`front_end_buffers`; the arithmetic is float64.
    """
    wave = pad_to_min_length(check_wave(wave)).astype(np.float64)
    db = _log_mel_numpy_one(wave, 0, bf16_buffers)
    rows = [np.maximum(db, db.max() - C.TOP_DB)]
    if acoustic_mels:
        rows.append(_log_mel_numpy_one(wave, acoustic_mels, bf16_buffers))
    return np.concatenate(rows).astype(np.float32)


def log_mel(wave: np.ndarray, *, acoustic_mels: int = 0, bf16_buffers: bool = False, n_threads: int | None = None) -> np.ndarray:
    """The exact log-mel ``[64 + acoustic_mels, 1 + max(L, 3200) // 160]`` of a 16 kHz mono clip
    (C++ extension).

    Same definition as :func:`log_mel_numpy`; float32 input is read without a copy and frames
    are computed in parallel over ``n_threads`` (default: all available cores) with the GIL
    released. Raises :class:`AudioError` for empty or non-finite input.
    """
    from .. import _mel

    wave = np.asarray(wave)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
        check_wave(wave)  # raises the descriptive AudioError
    try:
        return _mel.log_mel(wave, acoustic_mels=acoustic_mels, bf16_buffers=bf16_buffers, n_threads=resolve_threads(n_threads))
    except ValueError as e:
        raise AudioError(f"audio: {e}") from e


class _PaddedFrames:
    """One front end's frames of a stream: keeps the reflect-padded signal from the next frame on."""

    def __init__(self, acoustic_mels: int, bf16_buffers: bool, n_threads: int) -> None:
        self.acoustic_mels, self.bf16_buffers, self.n_threads = acoustic_mels, bf16_buffers, n_threads
        self.n_fft = C.ACOUSTIC_N_FFT if acoustic_mels else C.N_FFT
        self.rows = acoustic_mels or C.N_MELS
        self.half = self.n_fft // 2
        self.n_frames_done = 0
        self.peak = -np.inf
        self._buf = np.zeros(0, np.float32)  # padded-signal samples from frame n_frames_done on
        self._started = False

    def _frames(self, n: int) -> np.ndarray:
        from .. import _mel

        db, peak = _mel.raw_db_frames(self._buf, n, acoustic_mels=self.acoustic_mels, bf16_buffers=self.bf16_buffers,
                                      n_threads=self.n_threads)
        self.peak = max(self.peak, peak)
        self.n_frames_done += n
        return db

    def _start(self) -> None:
        self._buf = np.concatenate([self._buf[1 : self.half + 1][::-1], self._buf])
        self._started = True

    def feed(self, block: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, block])
        if not self._started:
            # The start needs samples 1..half for its reflection; until then, wait.
            if self._buf.size <= self.half:
                return np.zeros((self.rows, 0), np.float32)
            self._start()
        n = (self._buf.size - self.n_fft) // C.HOP_LENGTH + 1 if self._buf.size >= self.n_fft else 0
        if n <= 0:
            return np.zeros((self.rows, 0), np.float32)
        db = self._frames(n)
        self._buf = self._buf[n * C.HOP_LENGTH :]
        return db

    def finish(self, n_samples: int) -> np.ndarray:
        total = max(n_samples, C.MIN_SAMPLES)
        if total > n_samples:
            self._buf = np.concatenate([self._buf, np.zeros(total - n_samples, np.float32)])
        if not self._started:
            self._start()
        # reflection of the last samples, edge sample not repeated
        self._buf = np.concatenate([self._buf, self._buf[-self.half - 1 : -1][::-1]])
        return self._frames(C.n_frames(total) - self.n_frames_done)


class LogMelStream:
    """Log-mel of audio that arrives in blocks, identical to :func:`log_mel` of the whole clip.

    ``feed(block)`` returns the frames ``[64 + acoustic_mels, k]`` that the samples so far
    complete (semantic rows before top_db, which needs the clip's global maximum: :attr:`peak`);
    ``finish()`` returns the rest. Both front ends see each block once; frames the semantic mel
    completes before the wider acoustic window does wait for it. Memory is the output plus one
    block. :func:`log_mel_blocks` applies top_db at the end.
    """

    def __init__(self, *, acoustic_mels: int = 0, bf16_buffers: bool = False, n_threads: int | None = None) -> None:
        threads = resolve_threads(n_threads)
        self.rows = C.N_MELS + acoustic_mels
        self._parts = [_PaddedFrames(0, bf16_buffers, threads)]
        if acoustic_mels:
            self._parts.append(_PaddedFrames(acoustic_mels, bf16_buffers, threads))
        self._pending = [np.zeros((p.rows, 0), np.float32) for p in self._parts]
        self.n_samples = 0  # samples fed so far
        self._finished = False

    @property
    def peak(self) -> float:
        """The largest semantic dB value so far (top_db is relative to the clip's)."""
        return float(self._parts[0].peak)

    def _emit(self, new: list[np.ndarray]) -> np.ndarray:
        self._pending = [np.concatenate([p, d], axis=1) if p.shape[1] else d for p, d in zip(self._pending, new)]
        k = min(p.shape[1] for p in self._pending)
        out = np.concatenate([p[:, :k] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][:, :k]
        self._pending = [p[:, k:] for p in self._pending]
        return out

    def feed(self, block: np.ndarray) -> np.ndarray:
        """Add samples; return the newly completed frames ``[64 + acoustic_mels, k]`` (raw)."""
        if self._finished:
            raise RuntimeError("LogMelStream.feed after finish()")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise AudioError(f"audio block: expected 1-D samples, got shape {block.shape}")
        if not np.isfinite(block).all():
            raise AudioError(f"audio: {int(np.count_nonzero(~np.isfinite(block)))} samples near sample {self.n_samples} are NaN or infinite")
        self.n_samples += block.size
        return self._emit([p.feed(block) for p in self._parts])

    def peek_finish(self) -> tuple[np.ndarray, float]:
        """What :meth:`finish` would return now, and the peak it would leave, without ending
        the stream (a live stream's partial result of the audio so far)."""
        clone = copy.deepcopy(self)
        return clone.finish(), clone.peak

    def finish(self) -> np.ndarray:
        """Pad the end (3200-sample minimum, reflection) and return the remaining frames."""
        if self._finished:
            raise RuntimeError("LogMelStream.finish called twice")
        self._finished = True
        if self.n_samples == 0:
            raise AudioError("audio: the clip is empty (0 samples)")
        return self._emit([p.finish(self.n_samples) for p in self._parts])


def log_mel_blocks(blocks, *, expected_samples: int | None = None, acoustic_mels: int = 0, bf16_buffers: bool = False,
                   n_threads: int | None = None) -> np.ndarray:
    """:func:`log_mel` of the concatenation of ``blocks`` (an iterable of 1-D float arrays),
    computed block by block: equal to the one-shot result, without holding the whole waveform.

    Frames are written into one output array sized from ``expected_samples`` (e.g. from the
    file header) and grown by half when the guess is short, so peak memory stays near the size
    of the output plus one block. The result may be a column slice (not C-contiguous) of that
    array.
    """
    stream = LogMelStream(acoustic_mels=acoustic_mels, bf16_buffers=bf16_buffers, n_threads=n_threads)
    rows = stream.rows
    cap = C.n_frames(expected_samples) + 8 if expected_samples else 1024
    out = np.empty((rows, cap), np.float32)
    n = 0

    def put(db: np.ndarray) -> None:
        nonlocal out, n
        k = db.shape[1]
        if n + k > out.shape[1]:
            grown = np.empty((rows, max(n + k, out.shape[1] * 3 // 2)), np.float32)
            grown[:, :n] = out[:, :n]
            out = grown
        out[:, n : n + k] = db
        n += k

    for block in blocks:
        put(stream.feed(block))
    put(stream.finish())
    out = out[:, :n]  # a view when the guess was long: no second copy of a large output
    np.maximum(out[: C.N_MELS], np.float32(stream.peak - C.TOP_DB), out=out[: C.N_MELS])
    return out
