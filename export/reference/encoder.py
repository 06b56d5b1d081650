"""Full-precision PyTorch audio encoders and the 5 Hz projector (spec §2-3, §6.4), named like
the checkpoint.

Two encoders: the plain Dasheng ViT (MiDashengLM-7B) and the DashengTokenizer-style one
(MiDashengLM-0.6B): the same ViT under ``model.`` plus an acoustic branch over a second mel.
Module and parameter names equal the canonical tensor names below ``audio_encoder.`` and
``audio_projector.`` (see ``layout.py``), so the checkpoint loads by name. This is the model the
ONNX exporter traces, which is why a chunk (``forward_chunk``) is a method of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...runtime import constants as C
from ...runtime.config import EncoderConfig


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # Boolean key mask (True = may be attended to), broadcast over heads and queries; scale
        # head_dim**-0.5 is SDPA's default.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the original
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_stride)


def chunk_key_mask(n_samples: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Key mask ``[B, length]`` of the chunk starting at patch ``start``: patch < floor(L / 640).

    A chunk holding none of those keys is a clip's lone last patch (floor(L/640) is at most one
    short of the patch count); it attends to the clip's real patches, i.e. to itself. That is
    what the original ``dasheng`` encoder computes (its additive ``finfo.min`` mask turns an
    all-masked row uniform), whereas a boolean SDPA mask gives NaN there, and that NaN is not
    always dropped by the projector (L // 160 = 2019 keeps patch 504). Padding in a batch is
    never attended to.
    """
    idx = torch.arange(start, start + length, device=n_samples.device)[None, :]
    valid = idx < (n_samples // C.PATCH_HOP_SAMPLES)[:, None]
    real = idx < ((1 + n_samples // C.HOP_LENGTH) // C.PATCH_FRAMES)[:, None]
    return torch.where(valid.any(dim=1, keepdim=True), valid, real | ~real.any(dim=1, keepdim=True))


class DashengEncoder(nn.Module):
    """Log-mel ``[B, 64, T]`` -> 25 Hz features ``[B, T // 4, D]``, in independent 252-patch chunks."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.init_bn = nn.BatchNorm2d(cfg.n_mels)  # over mel bins; eps 1e-5 (PyTorch default)
        self.patch_embed = PatchEmbed(cfg)
        self.time_pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, 1, cfg.n_time_patches))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, 1, 1))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        """BatchNorm over mel bins + patch embedding: ``[B, 64, T]`` -> ``[B, T // 4, D]``."""
        x = self.init_bn(mel[:, :, None, :])[:, :, 0, :]  # bins as BN channels
        x = self.patch_embed.proj(x[:, None])  # [B, D, 1, P]
        return x[:, :, 0, :].transpose(1, 2)

    def forward_chunk(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """One chunk of at most 252 patches ``[B, t, D]``: positions restart at 0, blocks, final LN."""
        t = x.shape[1]
        pos = (self.time_pos_embed[0, :, 0, :t] + self.freq_pos_embed[0, :, 0, :]).transpose(0, 1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x, key_valid)
        return self.norm(x)

    def forward(self, mel: torch.Tensor, n_samples: torch.Tensor, *, zero_masked_rows: bool = False) -> torch.Tensor:
        """Encode a batch; ``n_samples`` [B] are the clip lengths in samples (for the key mask).

        ``zero_masked_rows``: in every chunk after the first, set the output rows of patches
        the key mask excludes (``patch >= floor(L / 640)``) to zero, as the DashengTokenizer
        encoder does (its ``mask_to_zero``); the first chunk keeps them.
        """
        x = self.embed(mel)
        out = []
        for start in range(0, x.shape[1], C.CHUNK_PATCHES):
            chunk = x[:, start : start + C.CHUNK_PATCHES]
            y = self.forward_chunk(chunk, chunk_key_mask(n_samples, start, chunk.shape[1]))
            if zero_masked_rows and start > 0:
                idx = torch.arange(start, start + chunk.shape[1], device=mel.device)[None, :]
                y = y * (idx < (n_samples // C.PATCH_HOP_SAMPLES)[:, None])[..., None]
            out.append(y)
        return torch.cat(out, dim=1)


class DashengTokenizerEncoder(nn.Module):
    """Stacked log-mel ``[B, 64 + n, T]`` -> ``[B, T // 4, D]``: the semantic Dasheng encoder
    (``model``, chunked, masked rows zeroed after the first chunk) plus the acoustic branch, a
    Conv2d over (n bins x 4 frames) patches of the acoustic mel and a LayerNorm (eps 1e-5)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if not cfg.acoustic_mels:
            raise ValueError("DashengTokenizerEncoder needs a config with acoustic mel bins")
        self.cfg = cfg
        self.model = DashengEncoder(cfg)
        n = cfg.acoustic_mels
        self.patch_embed = nn.Conv2d(1, cfg.embed_dim, kernel_size=(n, C.PATCH_FRAMES), stride=(n, C.PATCH_FRAMES))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=C.ACOUSTIC_NORM_EPS)

    def acoustic(self, mel: torch.Tensor) -> torch.Tensor:
        """Acoustic mel ``[B, n, T]`` -> ``[B, T // 4, D]``: one linear map per 4-frame patch, then LayerNorm."""
        x = self.patch_embed(mel[:, None])  # [B, D, 1, P]
        return self.norm(x[:, :, 0, :].transpose(1, 2))

    def forward(self, mel: torch.Tensor, n_samples: torch.Tensor) -> torch.Tensor:
        semantic = self.model(mel[:, : C.N_MELS], n_samples, zero_masked_rows=True)
        acoustic = self.acoustic(mel[:, C.N_MELS :])
        return semantic[:, : acoustic.shape[1]] + acoustic


def build_audio_encoder(cfg: EncoderConfig) -> DashengEncoder | DashengTokenizerEncoder:
    """The reference encoder of ``cfg``'s variant."""
    return DashengTokenizerEncoder(cfg) if cfg.variant == "dasheng_tokenizer" else DashengEncoder(cfg)


class AudioProjector(nn.Module):
    """Stack 5 consecutive 25 Hz frames of the stitched sequence -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, hidden: int, k: int = C.SUBSAMPLE) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(in_dim * k, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape
        n = p // self.k  # trailing p % 5 frames of the *stitched* sequence are dropped
        return self.net(x[:, : n * self.k].reshape(b, n, self.k * d))
