"""Synthetic checkpoints: official layout, determinism, tokenizer ids, sharding, bad input."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from mdl_edge.export.convert.checkpoint import Checkpoint
from mdl_edge.export.convert.layout import official_tensors
from mdl_edge.export.synthetic.checkpoint import preset_config, write_synthetic_checkpoint
from mdl_edge.export.synthetic.tokenizer import build_tokenizer
from mdl_edge.runtime.config import ModelConfig
from mdl_edge.runtime.errors import ConfigError, MdlEdgeError
from mdl_edge.runtime.prompt import SPECIAL_TOKENS


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_tiny_has_the_official_files_and_structure(tiny_dir) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"} <= names
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["MiDashengLMModel"]
    assert {"audio_encoder_config", "subsample_factor", "text_config", "audio_token_id"} <= cfg.keys()
    ckpt = Checkpoint(tiny_dir)  # validates every name and shape against the layout table
    assert "audio_encoder.front_end.0.mel_scale.fb" in ckpt.tensors
    assert "decoder.lm_head.weight" not in ckpt.tensors  # tied head, as Qwen3-0.6B
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    tok = json.loads((tiny_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert cfg["audio_token_id"] == ids["<|AUDIO|>"]


def test_tensor_names_follow_spec_table() -> None:
    """Spec §4.4: 397 encoder tensors (incl. 2 front-end buffers), 4 projector, 339 decoder for 7B;
    630.3 M encoder parameters and 7 615 616 512 decoder parameters."""
    cfg = ModelConfig.from_dict(preset_config("7b"))
    specs = official_tensors(cfg)
    enc = [s for s in specs if s.name.startswith("audio_encoder.")]
    assert len(enc) == 397
    assert len([s for s in specs if s.name.startswith("audio_projector.")]) == 4
    assert len([s for s in specs if s.name.startswith("decoder.")]) == 339
    enc_params = sum(math.prod(s.shape) for s in enc if s.kind not in ("bn_count", "mel_fb", "hann"))
    assert enc_params == 630_333_696
    assert sum(math.prod(s.shape) for s in specs if s.name.startswith("decoder.")) == 7_615_616_512
    shapes = {s.name: s.shape for s in specs}
    assert shapes["audio_encoder.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert shapes["audio_projector.net.0.weight"] == (3584, 6400)
    assert shapes["decoder.model.layers.27.self_attn.k_proj.bias"] == (512,)
    small = {s.name: s.shape for s in official_tensors(ModelConfig.from_dict(preset_config("0.6b")))}
    assert small["decoder.model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert small["decoder.model.layers.0.self_attn.q_proj.weight"] == (2048, 1024)
    # MiDashengLM-0.6B as best known (spec §6.4): Dasheng-base semantic ViT under model., a
    # 100-bin acoustic branch, projector 3840 -> 1024
    assert small["audio_projector.net.0.weight"] == (1024, 3840)
    assert small["audio_encoder.model.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert small["audio_encoder.patch_embed.weight"] == (768, 1, 100, 4)
    assert small["audio_encoder.norm.weight"] == (768,)
    assert not any(n.startswith("audio_encoder.blocks.") for n in small)
    old = {s.name: s.shape for s in official_tensors(ModelConfig.from_dict(preset_config("0.6b-dasheng-1280")))}
    assert old["audio_projector.net.0.weight"] == (1024, 6400) and old["audio_encoder.blocks.31.attn.qkv.weight"] == (3840, 1280)


def test_full_size_tokenizer_has_official_special_ids() -> None:
    tok = build_tokenizer(base_vocab=2000, special_start=151643, seed=0)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(151643, 151649))
    enc = tok.encode("<|im_start|>user\nA dog barks.<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == 151644 and enc.ids[-1] == 151645
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nA dog barks."
    assert max(enc.ids[1:-1]) < 2000  # real BPE pieces, not fillers


def test_deterministic_for_a_seed_and_sharding_independent(tmp_path, tiny_dir) -> None:
    again = write_synthetic_checkpoint("tiny", tmp_path / "again", seed=0, max_shard_bytes=200_000)
    other = write_synthetic_checkpoint("tiny", tmp_path / "other", seed=1)
    index = json.loads((again / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b, c = _tensors(tiny_dir), _tensors(again), _tensors(other)
    assert a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["audio_encoder.blocks.0.attn.qkv.weight"] == c["audio_encoder.blocks.0.attn.qkv.weight"]).all()
    assert (tiny_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    Checkpoint(again)


def test_initialised_like_real_models(tiny_dir) -> None:
    t = _tensors(tiny_dir)
    w = t["audio_encoder.blocks.0.mlp.fc1.weight"]
    assert 0.015 < float(w.std()) < 0.025
    ln = t["audio_encoder.blocks.0.norm1.weight"]
    assert abs(float(ln.mean()) - 1) < 0.05
    var = t["audio_encoder.init_bn.running_var"]
    assert (var > 50).all() and (var < 600).all()
    assert float(t["decoder.model.norm.weight"].mean()) == pytest.approx(1, abs=0.05)
    assert (t["audio_projector.net.0.bias"] != 0).any()


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        write_synthetic_checkpoint("huge", "/nonexistent")


def test_existing_folder_is_refused_and_nothing_half_written(tmp_path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MdlEdgeError, match="already exists"):
        write_synthetic_checkpoint("tiny", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    write_synthetic_checkpoint("tiny", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no partial folders left


def test_unwritable_output_folder(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MdlEdgeError, match="cannot create"):
        write_synthetic_checkpoint("tiny", blocker / "m")


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch) -> None:
    import mdl_edge.export.synthetic.checkpoint as synth

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "synthetic_tensor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_checkpoint("tiny", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
