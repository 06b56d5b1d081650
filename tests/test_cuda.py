"""The full-precision reference on CUDA matches the CPU run (skipped cleanly without a GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mdl_edge.runtime import constants as C

from conftest import assert_close, rel_max_error, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2", "tiny_tok"])
def test_reference_on_cuda_matches_cpu(which: str, request: pytest.FixtureRequest) -> None:
    """Qwen3 and Qwen2 tiny models and the DashengTokenizer-style encoder: log-mel (with the
    acoustic mel), encoder, embeddings, teacher-forced logits, greedy tokens."""
    import torch

    from mdl_edge.export.reference.model import MiDashengLM

    cpu = request.getfixturevalue(f"{which}_model")
    gpu = MiDashengLM.from_pretrained(request.getfixturevalue(f"{which}_dir"), device="cuda")
    # The reference is full precision: TF32 would cost ~1e-3 relative error in every matmul.
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    # 0.2 s (one lone patch), 10.11 s (crosses a chunk) and 25 s (three chunks).
    clips = [(np.random.default_rng(i).standard_normal(n) * 0.1).astype(np.float32) for i, n in enumerate([3200, 161760, 400000])]
    mel_c, len_c = cpu.log_mel(clips)
    mel_g, len_g = gpu.log_mel(clips)
    assert torch.equal(len_c, len_g.cpu())
    assert_close(mel_g, mel_c, atol=1e-3, what="log-mel cuda vs cpu (dB; acoustic rows in natural log)")
    with torch.inference_mode():
        feats_c = cpu.audio_encoder(mel_c, len_c)
        feats_g = gpu.audio_encoder(mel_g, len_g)
    for i, n in enumerate(len_c.tolist()):
        # Only the frames the projector reads: padding frames hold no defined value.
        valid = C.SUBSAMPLE * C.n_audio_tokens(n)
        err = rel_max_error(feats_g[i, :valid].cpu(), feats_c[i, :valid])
        assert err < 1e-4, f"clip {i}: encoder rel. max error {err:.3g}"
    for i, (a, b) in enumerate(zip(cpu.encode_audio(clips), gpu.encode_audio(clips))):
        err = rel_max_error(b.cpu(), a)
        assert err < 1e-4, f"clip {i}: embedding rel. max error {err:.3g}"
    ref = cpu.generate(clips[1], "Caption the audio.", max_new_tokens=16)
    got = gpu.generate(clips[1], "Caption the audio.", max_new_tokens=16)
    assert got.token_ids == ref.token_ids, f"cuda {got.token_ids} vs cpu {ref.token_ids}"
    with torch.inference_mode():
        ids = list(ref.prompt_ids) + list(ref.token_ids)
        emb_c = cpu.embed_prompt(ids, cpu.encode_audio([clips[1]]))
        emb_g = gpu.embed_prompt(ids, gpu.encode_audio([clips[1]]))
        logits_c = cpu.decoder(inputs_embeds=emb_c[None]).logits[0]
        logits_g = gpu.decoder(inputs_embeds=emb_g[None]).logits[0]
    err = rel_max_error(logits_g.cpu(), logits_c)
    assert err < 1e-4, f"teacher-forced logits rel. max error {err:.3g}"


def test_parity_report_on_cuda(bundle, tiny_qwen2_dir, capsys) -> None:
    """`mdl-edge parity --device cuda`: the reference runs on the GPU, the runtime variants on the CPU."""
    from mdl_edge.runtime.cli import main

    code = main(["parity", str(tiny_qwen2_dir), "--bundle", str(bundle), "--device", "cuda", "--json", "--max-new-tokens", "12"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["device"] == "cuda"
    assert max(report["mel"]) <= 1e-3
    assert report["encoder"]["fp32"]["feature_rel_max_error"] <= 1e-4
    assert report["decoder"]["f32"]["top1_agreement"] == 1.0
    assert report["end_to_end"]["fp32 + f32"]["exact_match_rate"] == 1.0


def test_onnx_encoder_cuda_provider(bundle) -> None:
    """The runtime encoder on ORT's CUDA provider equals its CPU run (needs onnxruntime-gpu)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    from mdl_edge.runtime.encoder import AudioEncoder
    from mdl_edge.runtime.mel import log_mel

    wave = (np.random.default_rng(3).standard_normal(250_000) * 0.1).astype(np.float32)
    mel = log_mel(wave)
    cpu = AudioEncoder(bundle).encode_mels([mel], [wave.size])[0]
    gpu = AudioEncoder(bundle, provider="cuda").encode_mels([mel], [wave.size])[0]
    err = rel_max_error(gpu, cpu)
    assert err < 1e-4, f"ORT CUDA vs CPU encoder rel. max error {err:.3g}"


@pytest.mark.slow
def test_real_size_reference_on_cuda(tmp_path) -> None:
    """0.6b preset (real Dasheng-0.6B and Qwen3-0.6B shapes), 30 s clip: CUDA vs CPU reference."""
    import time

    import torch

    from mdl_edge.export.reference.model import MiDashengLM
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint
    from mdl_edge.runtime.audio import demo_clip

    ckpt = write_synthetic_checkpoint("0.6b", tmp_path / "m", seed=0)
    wave = demo_clip(30.0, seed=0)
    out = {}
    for device in ("cpu", "cuda"):
        model = MiDashengLM.from_pretrained(ckpt, device=device)
        with torch.inference_mode():
            t = time.perf_counter()
            (emb,) = model.encode_audio([wave])
            if device == "cuda":
                torch.cuda.synchronize()
            enc_s = time.perf_counter() - t
            result = model.generate(wave, "Caption the audio.", max_new_tokens=16)
            ids = list(result.prompt_ids) + list(result.token_ids)
            logits = model.decoder(inputs_embeds=model.embed_prompt(ids, [emb])[None]).logits[0, len(result.prompt_ids) - 1 :]
        out[device] = (emb.cpu(), result, logits.cpu())
        print(f"\n{device}: audio tower {enc_s:.2f} s, generate {sum(result.timings.values()):.2f} s, timings {result.timings}")
        del model
    (emb_c, res_c, log_c), (emb_g, res_g, log_g) = out["cpu"], out["cuda"]
    err = rel_max_error(emb_g, emb_c)
    assert err < 1e-4, f"embedding rel. max error {err:.3g}"
    # Teacher-forced on the CPU run's tokens when the GPU's greedy output diverges (random
    # weights leave near-tied logits that fp32 summation order can flip).
    if res_g.token_ids == res_c.token_ids:
        err = rel_max_error(log_g, log_c)
        assert err < 1e-3, f"logits rel. max error {err:.3g}"
    else:
        first = next(i for i, (a, b) in enumerate(zip(res_g.token_ids, res_c.token_ids)) if a != b)
        top2 = torch.topk(log_c[first], 2).values
        assert float(top2[0] - top2[1]) < 1e-3 * float(log_c[first].abs().max()), f"greedy diverged at {first} with a clear margin"
