"""Full-precision PyTorch log-mel front end (spec §1), CPU or CUDA.

Frames are cut explicitly and transformed with ``torch.fft.rfft`` (not ``torch.stft``) so that
the tests' ``torch.stft`` computation is an independent check of it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import constants as C
from ..runtime.mel import bf16_round, check_wave, hann_window, mel_filterbank, pad_to_min_length


class LogMel(torch.nn.Module):
    """Waveforms ``[B, L]`` (16 kHz, zero-padded batch) -> log-mel ``[B, 64, 1 + L // 160]`` in float32.

    ``top_db`` is applied per utterance (product decision 1). ``bf16_buffers`` rounds window
    and filterbank to bfloat16 to reproduce bf16 deployments (spec §1.5); off by default.
    """

    def __init__(self, *, bf16_buffers: bool = False) -> None:
        super().__init__()
        window, fb = hann_window(), mel_filterbank()
        if bf16_buffers:
            window, fb = bf16_round(window), bf16_round(fb)
        self.register_buffer("window", torch.as_tensor(np.asarray(window, dtype=np.float32)), persistent=False)
        self.register_buffer("fb", torch.as_tensor(np.asarray(fb, dtype=np.float32)), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave.float()
        half = C.N_FFT // 2
        x = F.pad(wave[:, None, :], (half, half), mode="reflect")[:, 0]  # [B, L + 512]
        frames = x.unfold(-1, C.N_FFT, C.HOP_LENGTH)  # [B, T, 512]
        power = torch.fft.rfft(frames * self.window, n=C.N_FFT, dim=-1).abs().pow(2)  # [B, T, 257]
        db = 10.0 * torch.log10(torch.clamp(power @ self.fb, min=C.LOG_FLOOR))  # [B, T, 64]
        peak = db.amax(dim=(1, 2), keepdim=True)
        db = torch.maximum(db, peak - C.TOP_DB)
        return db.transpose(1, 2).contiguous()


def batch_waves(waves: Sequence[np.ndarray], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, pad each clip to >= 3200 samples, and right-pad the batch with zeros.

    Returns ``(waves [B, L_max] float32, lengths [B] int64)``; lengths are after min-padding.
    """
    clips = [pad_to_min_length(check_wave(w, name=f"audio[{i}]")) for i, w in enumerate(waves)]
    lengths = torch.tensor([c.size for c in clips], dtype=torch.int64)
    out = torch.zeros(len(clips), int(lengths.max()), dtype=torch.float32)
    for i, c in enumerate(clips):
        out[i, : c.size] = torch.from_numpy(c)
    return out.to(device), lengths.to(device)
