"""Full-precision PyTorch log-mel front end (spec §1), CPU or CUDA.

Window and filterbank are float32 values (or bf16-rounded ones), as in the fp32 reference; the
arithmetic runs in float64 and only the result is rounded to float32. In float32 arithmetic the
FFT round-off sits around 110 dB below a clip's peak, so bins that far down differ by up to 0.07 dB
between FFT libraries (MKL, pocketfft, cuFFT): float64 makes the reference the same on every
device and implementation, to 1e-5 dB.

Frames are cut explicitly and transformed with ``torch.fft.rfft`` (not ``torch.stft``) so that
the tests' ``torch.stft`` computation is an independent check of it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...runtime import constants as C
from ...runtime.mel import check_wave, front_end_buffers, pad_to_min_length


class LogMel(torch.nn.Module):
    """Waveforms ``[B, L]`` (16 kHz, zero-padded batch) -> log-mel ``[B, 64 + acoustic_mels, 1 + L // 160]``
    in float32.

    Rows 0-63 are the semantic mel (power, dB, ``top_db`` per utterance: product decision 1);
    with ``acoustic_mels`` the acoustic mel of DashengTokenizer-style encoders follows (n_fft
    1024, magnitude, natural log; spec §6.4). ``bf16_buffers`` rounds windows and filterbanks to
    bfloat16 to reproduce bf16 deployments (spec §1.5); off by default.
    """

    def __init__(self, *, acoustic_mels: int = 0, bf16_buffers: bool = False) -> None:
        super().__init__()
        self.acoustic_mels = acoustic_mels
        window, fb = front_end_buffers(bf16_buffers=bf16_buffers)
        self.register_buffer("window", torch.from_numpy(window), persistent=False)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)
        if acoustic_mels:
            window, fb = front_end_buffers(acoustic_mels=acoustic_mels, bf16_buffers=bf16_buffers)
            self.register_buffer("acoustic_window", torch.from_numpy(window), persistent=False)
            self.register_buffer("acoustic_fb", torch.from_numpy(fb), persistent=False)

    @staticmethod
    def _magnitude(wave: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """|rfft| of the reflect-padded frames ``[B, T, n_fft / 2 + 1]`` in float64."""
        n_fft = window.numel()
        x = F.pad(wave[:, None, :], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]  # [B, L + n_fft]
        frames = x.unfold(-1, n_fft, C.HOP_LENGTH)  # [B, T, n_fft]
        return torch.fft.rfft(frames * window.double(), n=n_fft, dim=-1).abs()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave.double()
        power = self._magnitude(wave, self.window).pow(2)  # [B, T, 257]
        db = 10.0 * torch.log10(torch.clamp(power @ self.fb.double(), min=C.LOG_FLOOR))  # [B, T, 64]
        peak = db.amax(dim=(1, 2), keepdim=True)
        db = torch.maximum(db, peak - C.TOP_DB)
        if self.acoustic_mels:
            mag = self._magnitude(wave, self.acoustic_window)  # [B, T, 513]
            db = torch.cat([db, torch.log(torch.clamp(mag @ self.acoustic_fb.double(), min=C.ACOUSTIC_LOG_FLOOR))], dim=2)
        return db.transpose(1, 2).float().contiguous()


def batch_log_mel(front_end: LogMel, waves: Sequence[np.ndarray], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel of several clips, each computed on its own, right-padded with zeros to a batch.

    Each clip is validated and zero-padded to >= 3200 samples first. Computing clips one by one
    keeps reflect padding at each clip's own end and top_db per clip, so a clip's features do
    not depend on what it is batched with. Returns ``(mel [B, rows, T_max], lengths [B])`` with
    lengths in samples after the 3200-sample padding.
    """
    clips = [pad_to_min_length(check_wave(w, name=f"audio[{i}]")) for i, w in enumerate(waves)]
    mels = [front_end(torch.from_numpy(c).to(device)[None])[0] for c in clips]
    out = torch.zeros(len(mels), mels[0].shape[0], max(m.shape[1] for m in mels), dtype=torch.float32, device=device)
    for i, m in enumerate(mels):
        out[i, :, : m.shape[1]] = m
    return out, torch.tensor([c.size for c in clips], dtype=torch.int64, device=device)
