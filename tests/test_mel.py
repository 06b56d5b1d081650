"""The C++ log-mel against the numpy reference and the PyTorch reference front end."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from mdl_edge import _mel
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.errors import AudioError
from mdl_edge.runtime.mel import LogMelStream, front_end_buffers, log_mel, log_mel_blocks, log_mel_numpy

from conftest import assert_close

SR = C.SAMPLE_RATE
SPEECH = Path(__file__).parent / "data" / "speech_espeak.flac"
ATOL_DB = 1e-3


def _boundary_lengths() -> list[int]:
    out = []
    for k in (1, 2, 3):
        for frames in (k * C.CHUNK_FRAMES - 1, k * C.CHUNK_FRAMES, k * C.CHUNK_FRAMES + 1):
            out += [(frames - 1) * C.HOP_LENGTH, (frames - 1) * C.HOP_LENGTH + C.HOP_LENGTH - 1]
    return out


LENGTHS = [1, 255, 256, 3199, 3200, 16000, 160640] + _boundary_lengths()


def signal(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    t = np.arange(n) / SR
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "white_noise":
        return (rng.standard_normal(n) * 0.3).astype(np.float32)
    if kind.startswith("sine_"):
        return (0.5 * np.sin(2 * np.pi * float(kind[5:]) * t)).astype(np.float32)
    if kind == "clipped_square":
        return np.clip(1.5 * np.sign(np.sin(2 * np.pi * 330 * t)), -1, 1).astype(np.float32)
    if kind == "speech":
        speech, sr = sf.read(SPEECH, dtype="float32")
        assert sr == SR
        return np.resize(speech, n)  # repeated to the length asked for
    raise ValueError(kind)


KINDS = ["silence", "white_noise", "sine_50", "sine_440", "sine_3000", "sine_7900", "clipped_square", "speech"]


@pytest.fixture(scope="module")
def torch_front_ends():
    from mdl_edge.export.reference.mel import LogMel

    return {False: LogMel(bf16_buffers=False), True: LogMel(bf16_buffers=True)}


def torch_reference(front_ends, wave: np.ndarray, bf16: bool) -> np.ndarray:
    import torch

    from mdl_edge.export.reference.mel import batch_log_mel

    with torch.inference_mode():
        mel, _ = batch_log_mel(front_ends[bf16], [wave])
    return mel[0].numpy()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_numpy_torch_agree(kind: str, bf16: bool, torch_front_ends) -> None:
    for n in LENGTHS:
        wave = signal(kind, n)
        cpp = log_mel(wave, bf16_buffers=bf16)
        assert cpp.shape == (C.N_MELS, C.n_frames(max(n, C.MIN_SAMPLES))) and cpp.dtype == np.float32
        assert_close(cpp, log_mel_numpy(wave, bf16_buffers=bf16), atol=ATOL_DB, what=f"C++ vs numpy, {kind}, {n} samples")
        assert_close(cpp, torch_reference(torch_front_ends, wave, bf16), atol=ATOL_DB, what=f"C++ vs torch, {kind}, {n} samples")


def test_buffers_are_cached_and_equal_numpy() -> None:
    for bf16 in (False, True):
        window, fb = front_end_buffers(bf16_buffers=bf16)
        assert np.array_equal(_mel.window(bf16_buffers=bf16), window)
        assert np.array_equal(_mel.filterbank(bf16_buffers=bf16), fb)
    assert not np.array_equal(_mel.filterbank(bf16_buffers=True), _mel.filterbank())


def test_threads_do_not_change_the_result() -> None:
    wave = signal("speech", 10 * SR + 123)
    one = log_mel(wave, n_threads=1)
    for n in (2, 3, 8):
        assert np.array_equal(one, log_mel(wave, n_threads=n))


def test_float64_input_is_accepted() -> None:
    wave = signal("white_noise", 20000)
    assert np.array_equal(log_mel(wave.astype(np.float64)), log_mel(wave))


BLOCK_CASES = [(n, b) for n in (1, 300, 3199, 16000, 161121, 480000) for b in (1, 100, 160, 257, 4096, 16000, 99991) if n // b <= 2000]


@pytest.mark.parametrize("n,block", BLOCK_CASES)
def test_blockwise_equals_one_shot(n: int, block: int) -> None:
    wave = signal("speech", n) * 0.5 + signal("white_noise", n) * 0.01
    blocks = (wave[i : i + block] for i in range(0, n, block))
    assert np.array_equal(log_mel_blocks(blocks), log_mel(wave))


def test_stream_gives_frames_as_audio_arrives() -> None:
    wave = signal("speech", 5 * SR)
    stream = LogMelStream()
    first = stream.feed(wave[: SR])
    assert first.shape[1] == (SR + 256 - 512) // 160 + 1  # every frame whose window is complete
    rest = stream.feed(wave[SR:])
    last = stream.finish()
    assert first.shape[1] + rest.shape[1] + last.shape[1] == C.n_frames(wave.size)
    with pytest.raises(RuntimeError):
        stream.feed(wave)


@pytest.mark.parametrize(
    "wave,exc,match",
    [
        (np.zeros(0, np.float32), AudioError, "empty"),
        (np.array([0.1, np.nan, 0.2] * 2000, np.float32), AudioError, "2000 of 6000 samples are NaN"),
        (np.array([np.inf] * 10, np.float32), AudioError, "NaN or infinite"),
        (np.zeros((2, 3200), np.float32), AudioError, "1-D"),
        (np.zeros(3200, np.int16), AudioError, "float"),
    ],
)
def test_bad_input_errors(wave, exc, match) -> None:
    with pytest.raises(exc, match=match):
        log_mel(wave)


def test_extension_errors_are_python_exceptions() -> None:
    # thread counts are resolved in Python (options.resolve_threads); the extension takes a number
    with pytest.raises(ValueError, match="n_threads must be >= 1, got 0"):
        _mel.log_mel(np.zeros(3200, np.float32), n_threads=0)
    with pytest.raises(ValueError, match="empty"):
        _mel.log_mel(np.zeros(0, np.float32), n_threads=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        _mel.log_mel(np.zeros(10, np.int32), n_threads=1)
    with pytest.raises(ValueError, match="1-D"):
        _mel.log_mel(np.zeros((3, 3), np.float32), n_threads=1)
    with pytest.raises(ValueError, match="too short"):
        _mel.raw_db_frames(np.zeros(600, np.float32), 3, n_threads=1)


def test_gil_is_released_during_compute() -> None:
    """Another Python thread keeps running while a long log-mel is computed."""
    wave = signal("white_noise", 120 * SR)
    ticks = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            ticks.append(1)

    t = threading.Thread(target=count)
    t.start()
    try:
        for _ in range(3):
            log_mel(wave, n_threads=1)
    finally:
        done.set()
        t.join()
    assert len(ticks) > 1000


special = st.sampled_from([0.0, -0.0, 1e-45, 1e-38, 3e38, -3e38, np.nan, np.inf, 1.0, -1.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), special), min_size=0, max_size=5000))
def test_never_crashes(values) -> None:
    wave = np.asarray(values, dtype=np.float32)
    try:
        out = _mel.log_mel(wave, n_threads=2)
    except ValueError as e:
        assert wave.size == 0 or not np.isfinite(wave).all(), e
        return
    assert np.isfinite(wave).all() and wave.size > 0
    assert out.shape == (64, C.n_frames(max(wave.size, C.MIN_SAMPLES)))
    assert np.isfinite(out).all()
    assert out.max() - out.min() <= C.TOP_DB + 1e-3
