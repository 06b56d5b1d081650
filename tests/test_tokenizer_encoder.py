"""The DashengTokenizer-style encoder of MiDashengLM-0.6B (spec §6.4), stage by stage.

- The acoustic mel (C++, numpy, PyTorch reference) against librosa's STFT and mel filterbank.
- The reference encoder against a twin assembled the way the public DashengTokenizer code does it
  (1008-frame splits, per-split key masks, masked rows zeroed after the first split, a Conv2d +
  LayerNorm acoustic branch added), from code nobody here wrote: the `dasheng` package's encoder
  and torch's own Conv2d / LayerNorm, fed librosa's acoustic mel.
- Checkpoint recognition (config or tensors; both BatchNorm spellings; front-end buffers checked).
- The ONNX chunk graph (fp32, int8, int8-static) against the reference, at the chunk corners.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.errors import CheckpointError
from mdl_edge.runtime.mel import log_mel, log_mel_blocks, log_mel_numpy

from conftest import assert_close, chirp, rel_max_error
from test_reference_encoder import LENGTHS, import_dasheng, waves

N_AC = 100


def librosa_acoustic_mel(wave: np.ndarray, n_mels: int = N_AC) -> np.ndarray:
    """The spec's acoustic mel from librosa: reflect-centred STFT (n_fft = window = 1024, hop 160,
    periodic Hann), magnitude, HTK filterbank 0-8000 Hz without area normalisation, natural log."""
    import librosa

    x = np.pad(wave.astype(np.float64), (0, max(0, C.MIN_SAMPLES - wave.size)))
    spec = np.abs(librosa.stft(x, n_fft=1024, hop_length=C.HOP_LENGTH, win_length=1024, window="hann", center=True, pad_mode="reflect"))
    fb = librosa.filters.mel(sr=C.SAMPLE_RATE, n_fft=1024, n_mels=n_mels, fmin=0.0, fmax=8000.0, htk=True, norm=None, dtype=np.float64)
    return np.log(np.maximum(fb @ spec, 1e-7))


@pytest.fixture(scope="module")
def tok_dir(tiny_tok_dir: Path) -> Path:
    return tiny_tok_dir


@pytest.fixture(scope="module")
def tok_model(tiny_tok_model):
    return tiny_tok_model


@pytest.mark.parametrize("n", [1, 3199, 16000, 16479, 161280, 161439])
def test_acoustic_mel_matches_librosa(n: int) -> None:
    wave = chirp(n / C.SAMPLE_RATE + 1e-9, seed=n % 7)[:n] if n > 1 else np.array([0.3], np.float32)
    want = librosa_acoustic_mel(wave)
    cpp = log_mel(wave, acoustic_mels=N_AC)
    assert cpp.shape == (C.N_MELS + N_AC, C.n_frames(max(n, C.MIN_SAMPLES)))
    assert_close(cpp[C.N_MELS :], want, atol=1e-4, what=f"C++ acoustic mel, {n} samples")
    assert_close(log_mel_numpy(wave, acoustic_mels=N_AC)[C.N_MELS :], want, atol=1e-4, what=f"numpy acoustic mel, {n} samples")
    # the semantic rows are the 64-bin mel as before
    assert np.array_equal(cpp[: C.N_MELS], log_mel(wave))


def test_reference_acoustic_mel_matches_librosa() -> None:
    from mdl_edge.export.reference.mel import LogMel, batch_log_mel

    clips = [chirp(1.3, 1), chirp(4.0, 2)]
    mel, _ = batch_log_mel(LogMel(acoustic_mels=N_AC), clips)
    for i, c in enumerate(clips):
        t = C.n_frames(c.size)
        assert_close(mel[i, C.N_MELS :, :t], librosa_acoustic_mel(c), atol=1e-4, what=f"reference acoustic mel, clip {i}")


@pytest.mark.parametrize("block", [1000, 160, 7777])
def test_acoustic_mel_blockwise_equals_one_shot(block: int) -> None:
    wave = chirp(2.5, 4)
    blocks = [wave[i : i + block] for i in range(0, wave.size, block)]
    assert np.array_equal(log_mel_blocks(blocks, acoustic_mels=N_AC), log_mel(wave, acoustic_mels=N_AC))


def test_bad_acoustic_bin_count_is_an_error() -> None:
    from mdl_edge.runtime.errors import AudioError

    with pytest.raises(AudioError, match="acoustic_mels"):
        log_mel(chirp(1.0, 1), acoustic_mels=100_000)


@pytest.fixture(scope="module")
def public_twin(tok_model):
    """The public DashengTokenizerEncoder's forward, assembled from the `dasheng` package's
    encoder (semantic path) and torch modules (acoustic path), holding the reference's weights."""
    Dasheng = import_dasheng()
    cfg = tok_model.cfg.encoder
    sem = Dasheng(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
                  patch_stride=cfg.patch_stride, target_length=cfg.target_length, qkv_bias=cfg.qkv_bias)
    enc = tok_model.audio_encoder
    sem.load_state_dict({k.replace("init_bn.", "init_bn.1."): v for k, v in enc.model.state_dict().items()}, strict=True)
    sem.eval()
    conv = torch.nn.Conv2d(1, cfg.embed_dim, (N_AC, 4), (N_AC, 4))
    conv.load_state_dict(enc.patch_embed.state_dict())
    norm = torch.nn.LayerNorm(cfg.embed_dim)  # PyTorch's default eps, as the public code
    norm.load_state_dict(enc.norm.state_dict())

    def forward(semantic_mel: torch.Tensor, acoustic_mel: torch.Tensor, n: int) -> torch.Tensor:
        x = sem.init_bn(semantic_mel[None, None])
        valid_frames = n // C.HOP_LENGTH  # the public front end's frame mask: arange(T) < L // hop
        outs = []
        for i, start in enumerate(range(0, x.shape[-1], C.CHUNK_FRAMES)):
            split = x[..., start : start + C.CHUNK_FRAMES]
            if split.shape[-1] < C.PATCH_FRAMES:
                continue  # a padded last piece is cut off by the acoustic length below
            valid = max(0, min(valid_frames - start, split.shape[-1])) // C.PATCH_FRAMES
            # dasheng's own key mask from a length in samples: valid * 640 gives `valid` keys
            y = sem.forward_spectrogram(split, x_length=torch.tensor([max(valid, 1) * C.PATCH_HOP_SAMPLES]))
            if i:
                y = y * (torch.arange(y.shape[1]) < valid)[None, :, None]
            outs.append(y)
        semantic = torch.cat(outs, dim=1)
        a = norm(conv(acoustic_mel[None, None]).flatten(2).transpose(1, 2))
        return semantic[:, : a.shape[1]] + a

    return forward


def test_encoder_matches_public_tokenizer_structure(tok_model, public_twin) -> None:
    """Same weights; the twin reads librosa's acoustic mel: outputs agree to fp32 round-off for
    every corner length (partial chunks, a masked last patch, a lone patch in its own chunk)."""
    for n, wave in zip(LENGTHS, waves(LENGTHS)):
        with torch.inference_mode():
            mel, lengths = tok_model.log_mel([wave])
            ours = tok_model.audio_encoder(mel, lengths)[0]
            acoustic = torch.from_numpy(librosa_acoustic_mel(wave).astype(np.float32))
            theirs = public_twin(mel[0, : C.N_MELS], acoustic, n)[0]
        assert ours.shape == (C.n_patches(n), tok_model.cfg.encoder.embed_dim)
        assert_close(ours, theirs, atol=5e-5, rtol=1e-5, what=f"tokenizer encoder output, clip of {n} samples")


def test_masked_rows_are_zeroed_after_the_first_chunk_only(tok_model) -> None:
    """161 760 samples: the lone last patch (252) is masked and alone in chunk 2, so its semantic
    row is zero and only the acoustic part remains; 16 480 samples: the masked last patch of
    chunk 1 keeps its semantic row."""
    enc = tok_model.audio_encoder
    for n, zeroed in ((161760, True), (16480, False)):
        wave = waves([n])[0]
        with torch.inference_mode():
            mel, lengths = tok_model.log_mel([wave])
            out = enc(mel, lengths)[0, -1]
            acoustic = enc.acoustic(mel[:, C.N_MELS :])[0, -1]
        assert C.n_valid_keys(n) < C.n_patches(n)
        assert torch.allclose(out, acoustic, atol=1e-6) == zeroed, f"{n} samples: semantic row zeroed should be {zeroed}"


def test_checkpoint_layouts_and_variant(tok_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mdl_edge.export.convert.checkpoint import Checkpoint

    ck = Checkpoint(tok_dir)
    assert ck.layout.name == "dashengtokenizer-sequential-bn"
    assert ck.config.encoder.variant == "dasheng_tokenizer" and ck.config.encoder.acoustic_mels == N_AC
    state = load_file(str(tok_dir / "model.safetensors"))

    def variant(name: str, tensors: dict, config_edit=None) -> Path:
        d = tmp_path / name
        shutil.copytree(tok_dir, d)
        (d / "model.safetensors").unlink()
        save_file(tensors, str(d / "model.safetensors"))
        if config_edit:
            cfg = json.loads((d / "config.json").read_text())
            config_edit(cfg["audio_encoder_config"])
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    # BatchNorm as a plain module, and a config that names neither the variant nor the bins:
    # recognised from the tensors, the bin count from the acoustic conv.
    flat = {k.replace("model.init_bn.1.", "model.init_bn."): v for k, v in state.items()}

    def plain_config(e: dict) -> None:
        e.pop("n_mels_patch")
        e["model_type"] = "midashenglm_dasheng_encoder"

    ck = Checkpoint(variant("flat", flat, plain_config))
    assert (ck.layout.name, ck.config.encoder.acoustic_mels) == ("dashengtokenizer", N_AC)

    # the acoustic branch missing
    with pytest.raises(CheckpointError, match=r"2 missing tensor\(s\):\n  audio_encoder.norm.weight\n  audio_encoder.norm.bias"):
        Checkpoint(variant("no-norm", {k: v for k, v in state.items() if not k.startswith("audio_encoder.norm.")}))
    # a conv that disagrees with n_mels_patch
    bad = dict(state, **{"audio_encoder.patch_embed.weight": torch.zeros(64, 1, 80, 4)})
    with pytest.raises(CheckpointError, match=r"audio_encoder.patch_embed.weight: stored \[64, 1, 80, 4\], config implies \[64, 1, 100, 4\]"):
        Checkpoint(variant("bad-conv", bad))
    # a front-end buffer of another front end (a 128-bin filterbank's first 100 bands) is refused
    import librosa

    other = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=0, fmax=8000, htk=True, norm=None)[:N_AC].T.copy()
    bad = dict(state, **{"audio_encoder.front_end.mel_spec.mel_scale.fb": torch.from_numpy(other)})
    with pytest.raises(CheckpointError, match="front_end.mel_spec.mel_scale.fb differs from the spec's mel filterbank"):
        Checkpoint(variant("bad-fb", bad))
    # an unexpected tensor is named with its stored spelling
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\):\n  audio_encoder.model.extra"):
        Checkpoint(variant("extra", dict(state, **{"audio_encoder.model.extra": torch.zeros(3)})))


@pytest.fixture(scope="module")
def tok_onnx(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mdl_edge.export.convert.onnx_encoder import export_audio_onnx
    from mdl_edge.quantize.encoder import quantize_encoder

    out = tmp_path_factory.mktemp("tok-onnx")
    export_audio_onnx(tok_dir, out)
    for v in ("int8", "int8-static"):
        quantize_encoder(out, v)
    return out


@pytest.mark.parametrize("n", LENGTHS + [480000])
def test_onnx_matches_reference(tok_model, tok_onnx: Path, n: int) -> None:
    from mdl_edge.runtime.encoder import AudioEncoder

    enc = AudioEncoder(tok_onnx)
    assert enc.acoustic_mels == N_AC
    wave = waves([n])[0]
    want = tok_model.encode_audio([wave])[0].numpy()
    got = enc.embed(wave)
    assert got.shape == want.shape == (C.n_audio_tokens(n), tok_model.cfg.decoder.hidden_size)
    err = rel_max_error(got, want)
    assert err <= 2e-5, f"{n} samples: ONNX fp32 embeddings vs reference rel. error {err:.2e}"


@pytest.mark.parametrize("variant,floor", [("int8", 0.99), ("int8-static", 0.98)])
def test_int8_variants_stay_close(tok_onnx: Path, variant: str, floor: float) -> None:
    from mdl_edge.quantize.encoder import variant_file
    from mdl_edge.runtime.encoder import AudioEncoder
    from mdl_edge.runtime.onnx_meta import read_file_metadata

    ref, var = AudioEncoder(tok_onnx), AudioEncoder(tok_onnx, encoder_file=variant_file(variant))
    assert var.acoustic_mels == N_AC
    wave = chirp(12.0, 5)
    a, b = ref.embed(wave), var.embed(wave)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= floor, f"{variant}: embedding cosine min {cos.min():.4f} < {floor}"
    drift = read_file_metadata(tok_onnx / variant_file(variant))["drift_vs_fp32"]
    assert drift["embedding_cosine_min"] >= floor, drift


def test_int8_keeps_both_patch_embeddings_fp32(tok_onnx: Path) -> None:
    import onnx

    from mdl_edge.quantize.encoder import patch_embed_nodes, variant_file

    graph = onnx.load(str(tok_onnx / "encoder.onnx"), load_external_data=False)
    names = patch_embed_nodes(graph)
    assert len(names) == 2, names
    q = onnx.load(str(tok_onnx / variant_file("int8")), load_external_data=False)
    weights = {i.name for i in q.graph.initializer}
    float_mm = [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert sorted(float_mm) == sorted(names), float_mm


def test_bundle_and_parity_end_to_end(tok_dir: Path, tmp_path: Path, capsys) -> None:
    """`mdl-edge export` of the variant, the runtime answering from the bundle (its mel carries the
    acoustic rows), and `mdl-edge parity` reporting both mels and greedy exact match."""
    from mdl_edge.runtime.cli import main
    from mdl_edge.runtime.pipeline import AudioLM

    out = tmp_path / "bundle"
    assert main(["export", str(tok_dir), str(out), "--encoder", "fp32,int8", "--decoder", "f32"]) == 0
    capsys.readouterr()
    wave = chirp(7.0, 3)
    with AudioLM(out, encoder="fp32") as lm:
        emb, n = lm.embed(wave, sample_rate=C.SAMPLE_RATE)
        assert lm.encoder.acoustic_mels == N_AC
    from mdl_edge.export.reference.model import MiDashengLM

    want = MiDashengLM.from_pretrained(tok_dir).encode_audio([wave])[0].numpy()
    assert n == wave.size and rel_max_error(emb, want) <= 2e-5
    assert main(["parity", str(tok_dir), "--bundle", str(out), "--json", "--max-new-tokens", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert max(report["mel"]) <= 1e-3 and max(report["acoustic_mel"]) <= 1e-4, (report["mel"], report["acoustic_mel"])
    assert report["encoder"]["fp32"]["feature_rel_max_error"] <= 1e-4
    assert report["end_to_end"]["fp32 + f32"]["exact_match_rate"] == 1.0
