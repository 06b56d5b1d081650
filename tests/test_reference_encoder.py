"""The reference encoder against the `dasheng` package's encoder (code nobody here wrote).

`dasheng` 0.0.9 imports torchaudio at import time, and torchaudio does not import beside the
torch we use; its front end is not used when the log-mel is fed directly, so a minimal stand-in
module is registered for the import only.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from mdl_edge.runtime import constants as C

from conftest import assert_close, rel_max_error

# Clip lengths (samples): 0.2 s, 1 s, 10.07/10.08/10.09 s, 20.16 s, 25 s; and the key-mask corners:
# (L // 160) % 4 == 3 (last patch masked), a lone masked patch in a chunk of its own (161 760),
# and one whose lone masked patch is kept by the projector (323 040, where SDPA would give NaN).
LENGTHS = [3200, 16000, 161120, 161280, 161440, 322560, 400000, 16480, 16639, 161760, 323040]


def import_dasheng():
    class _FrontEndStandIn(torch.nn.Module):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError("stand-in: feed log-mel to the dasheng encoder directly")

    saved = {k: sys.modules.get(k) for k in ("torchaudio", "torchaudio.transforms")}
    ta = types.ModuleType("torchaudio")
    tt = types.ModuleType("torchaudio.transforms")
    tt.MelSpectrogram = tt.AmplitudeToDB = _FrontEndStandIn
    ta.transforms = tt
    sys.modules.update({"torchaudio": ta, "torchaudio.transforms": tt})
    try:
        from dasheng.pretrained.pretrained import Dasheng
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return Dasheng


@pytest.fixture(scope="module")
def dasheng_twin(tiny_model):
    """The dasheng package's encoder holding the tiny reference encoder's weights."""
    Dasheng = import_dasheng()
    cfg = tiny_model.cfg.encoder
    twin = Dasheng(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
                   patch_stride=cfg.patch_stride, target_length=cfg.target_length, qkv_bias=cfg.qkv_bias)
    state = {k.replace("init_bn.", "init_bn.1."): v for k, v in tiny_model.audio_encoder.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def waves(lengths: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(n) * 0.1 * (1 + np.sin(np.arange(n) / 800.0))).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("batched", [True, False])
def test_encoder_matches_dasheng_package(tiny_model, dasheng_twin, batched: bool) -> None:
    """Same weights, same log-mel: outputs agree to fp32 round-off, clip by clip and in a padded
    batch. (In a batch, dasheng spreads a lone masked patch's attention uniformly over the chunk's
    padding too; that one patch is compared in the single-clip run only.)"""
    clips = waves(LENGTHS)
    groups = [list(range(len(LENGTHS)))] if batched else [[i] for i in range(len(LENGTHS))]
    for group in groups:
        with torch.inference_mode():
            mel, lengths = tiny_model.log_mel([clips[i] for i in group])
            ours = tiny_model.audio_encoder(mel, lengths)
            theirs = dasheng_twin.forward_spectrogram(dasheng_twin.init_bn(mel[:, None]), x_length=lengths)
        for j, i in enumerate(group):
            n = LENGTHS[i]
            p = C.n_patches(n)
            if batched and p % C.CHUNK_PATCHES == 1 and C.n_valid_keys(n) < p:
                p -= 1
            assert_close(ours[j, :p], theirs[j, :p], atol=2e-5, rtol=1e-5, what=f"encoder output, clip of {n} samples")


@pytest.mark.parametrize("n", LENGTHS)
def test_batch_equals_single(tiny_model, n: int) -> None:
    clips = waves(LENGTHS)
    i = LENGTHS.index(n)
    batch = tiny_model.encode_audio(clips)[i]
    alone = tiny_model.encode_audio([clips[i]])[0]
    assert batch.shape == (C.n_audio_tokens(n), tiny_model.cfg.decoder.hidden_size)
    assert torch.isfinite(alone).all()
    assert rel_max_error(batch, alone) <= 1e-5, f"clip {n}: batched vs alone rel. error {rel_max_error(batch, alone):.2e}"


def test_projector_groups_straddle_chunks(tiny_model) -> None:
    """The projector runs on the stitched 25 Hz sequence: group 50 takes patches 250-254,
    across the 252-patch chunk boundary (a per-chunk projector would give 50 + ... tokens)."""
    (clip,) = waves([322560])
    with torch.inference_mode():
        mel, lengths = tiny_model.log_mel([clip])
        feats = tiny_model.audio_encoder(mel, lengths)
        (emb,) = tiny_model.encode_audio([clip])
        expected = tiny_model.audio_projector.net(feats[0, 250:255].reshape(1, -1))[0]
    assert emb.shape[0] == C.n_audio_tokens(322560) == 100
    assert_close(emb[50], expected, atol=1e-6, what="token 50 from patches 250..254")


def test_chunks_are_independent(tiny_model) -> None:
    """Changing audio in the second chunk leaves the first chunk's features unchanged."""
    a = waves([322560])[0]
    b = a.copy()
    b[200_000:] *= -3.0
    with torch.inference_mode():
        mel_a, la = tiny_model.log_mel([a])
        mel_b, lb = tiny_model.log_mel([b])
        # top_db is per clip; keep the first chunk's mel identical so only chunk 2 differs
        mel_b[..., :1008] = mel_a[..., :1008]
        fa, fb = tiny_model.audio_encoder(mel_a, la), tiny_model.audio_encoder(mel_b, lb)
    assert_close(fa[0, :252], fb[0, :252], atol=0, what="chunk 1 features")
    assert (fa[0, 252:] - fb[0, 252:]).abs().max() > 1e-3
