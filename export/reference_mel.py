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

from ..runtime import constants as C
from ..runtime.mel import check_wave, front_end_buffers, pad_to_min_length


class LogMel(torch.nn.Module):
    """Waveforms ``[B, L]`` (16 kHz, zero-padded batch) -> log-mel ``[B, 64, 1 + L // 160]`` in float32.

    ``top_db`` is applied per utterance (product decision 1). ``bf16_buffers`` rounds window
    and filterbank to bfloat16 to reproduce bf16 deployments (spec §1.5); off by default.
    """

    def __init__(self, *, bf16_buffers: bool = False) -> None:
        super().__init__()
        window, fb = front_end_buffers(bf16_buffers=bf16_buffers)
        self.register_buffer("window", torch.from_numpy(window), persistent=False)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave.double()
        half = C.N_FFT // 2
        x = F.pad(wave[:, None, :], (half, half), mode="reflect")[:, 0]  # [B, L + 512]
        frames = x.unfold(-1, C.N_FFT, C.HOP_LENGTH)  # [B, T, 512]
        power = torch.fft.rfft(frames * self.window.double(), n=C.N_FFT, dim=-1).abs().pow(2)  # [B, T, 257]
        db = 10.0 * torch.log10(torch.clamp(power @ self.fb.double(), min=C.LOG_FLOOR))  # [B, T, 64]
        peak = db.amax(dim=(1, 2), keepdim=True)
        db = torch.maximum(db, peak - C.TOP_DB)
        return db.transpose(1, 2).float().contiguous()


def batch_log_mel(front_end: LogMel, waves: Sequence[np.ndarray], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel of several clips, each computed on its own, right-padded with zeros to a batch.

    Each clip is validated and zero-padded to >= 3200 samples first. Computing clips one by one
    keeps reflect padding at each clip's own end and top_db per clip, so a clip's features do
    not depend on what it is batched with. Returns ``(mel [B, 64, T_max], lengths [B])`` with
    lengths in samples after the 3200-sample padding.
    """
    clips = [pad_to_min_length(check_wave(w, name=f"audio[{i}]")) for i, w in enumerate(waves)]
    mels = [front_end(torch.from_numpy(c).to(device)[None])[0] for c in clips]
    out = torch.zeros(len(mels), C.N_MELS, max(m.shape[1] for m in mels), dtype=torch.float32, device=device)
    for i, m in enumerate(mels):
        out[i, :, : m.shape[1]] = m
    return out, torch.tensor([c.size for c in clips], dtype=torch.int64, device=device)
