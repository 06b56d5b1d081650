"""The same reference code on CUDA matches the CPU run (skipped cleanly without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_max_error, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


def test_reference_on_cuda_matches_cpu(tiny_dir, tiny_model) -> None:
    import torch

    from mdl_edge.export.reference_model import MiDashengLM

    gpu = MiDashengLM.from_pretrained(tiny_dir, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    clips = [(np.random.default_rng(i).standard_normal(n) * 0.1).astype(np.float32) for i, n in enumerate([3200, 161760, 400000])]
    mel_c, _ = tiny_model.log_mel(clips)
    mel_g, _ = gpu.log_mel(clips)
    assert float((mel_c - mel_g.cpu()).abs().max()) < 1e-3
    for a, b in zip(tiny_model.encode_audio(clips), gpu.encode_audio(clips)):
        assert rel_max_error(b.cpu(), a) < 1e-4
    ref = tiny_model.generate(clips[1], "Caption the audio.", max_new_tokens=8)
    got = gpu.generate(clips[1], "Caption the audio.", max_new_tokens=8)
    assert got.token_ids == ref.token_ids
