"""The MiDashengLM signal chain in one place, each constant derived from the ones above it.

16 000 Hz audio -> 100 mel frames/s (hop 160) -> 25 Hz encoder patches (4 frames each)
-> 5 Hz audio tokens (5 patches each). One encoder chunk is 1008 frames = 252 patches = 10.08 s.
A mismatch in this chain fails at import time.
"""

from __future__ import annotations


def _exact_div(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not a multiple of {b}")
    return a // b


SAMPLE_RATE = 16_000
N_FFT = 512
WIN_LENGTH = 512
HOP_LENGTH = 160
N_FREQS = N_FFT // 2 + 1  # 257 one-sided STFT bins
N_MELS = 64
F_MIN = 0.0
F_MAX = SAMPLE_RATE / 2  # 8000 Hz
LOG_FLOOR = 1e-10  # amin of AmplitudeToDB: 10*log10(1e-10) = -100 dB
TOP_DB = 120.0  # per clip: values below (max - 120 dB) are raised to it
MIN_SAMPLES = 3200  # shorter clips are zero-padded to this (0.2 s, one audio token)

# The acoustic branch of DashengTokenizer-style encoders (MiDashengLM-0.6B, spec §6.4): a second,
# Vocos-style mel on the same 160-sample hop (so the same 1 + L // 160 frames), magnitude rather
# than power, natural log, no top_db; a Conv2d over (bins x 4 frames) patches + LayerNorm.
ACOUSTIC_N_FFT = 1024  # window = n_fft (periodic Hann), centre padding by reflection
ACOUSTIC_N_FREQS = ACOUSTIC_N_FFT // 2 + 1  # 513
ACOUSTIC_LOG_FLOOR = 1e-7  # ln(max(mel, 1e-7))
ACOUSTIC_NORM_EPS = 1e-5  # the acoustic LayerNorm (PyTorch's default eps)

FRAMES_PER_SECOND = _exact_div(SAMPLE_RATE, HOP_LENGTH)  # 100
PATCH_FRAMES = 4  # Conv2d stride along time
PATCH_HOP_SAMPLES = HOP_LENGTH * PATCH_FRAMES  # 640: the reference key-mask divisor
PATCHES_PER_SECOND = _exact_div(FRAMES_PER_SECOND, PATCH_FRAMES)  # 25 Hz
CHUNK_FRAMES = 1008  # encoder target_length: 10.08 s
CHUNK_PATCHES = _exact_div(CHUNK_FRAMES, PATCH_FRAMES)  # 252
SUBSAMPLE = 5  # projector stacks 5 patches into one token
TOKENS_PER_SECOND = _exact_div(PATCHES_PER_SECOND, SUBSAMPLE)  # 5 Hz


def n_frames(n_samples: int) -> int:
    """Mel frames of a clip of ``n_samples`` (centred STFT): ``1 + L // 160``."""
    return 1 + n_samples // HOP_LENGTH


def n_patches(n_samples: int) -> int:
    """25 Hz encoder outputs of a clip: trailing ``frames % 4`` frames are dropped."""
    return n_frames(n_samples) // PATCH_FRAMES


def n_valid_keys(n_samples: int) -> int:
    """Patches the reference lets other patches attend to: ``floor(L / 640)``.

    One less than :func:`n_patches` whenever ``(L // 160) % 4 == 3`` (spec §2.6); we reproduce it.
    """
    return n_samples // PATCH_HOP_SAMPLES


def n_audio_tokens(n_samples: int) -> int:
    """Audio tokens of a clip, ``((1 + L // 160) // 4) // 5`` (after padding to 3200 samples)."""
    return n_patches(max(n_samples, MIN_SAMPLES)) // SUBSAMPLE
