"""Loading the official layout: every missing, unexpected or mis-shaped tensor is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdl_edge.export.convert.checkpoint import Checkpoint
from mdl_edge.export.reference.model import MiDashengLM
from mdl_edge.runtime.config import ModelConfig
from mdl_edge.runtime.errors import CheckpointError, ConfigError


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    fn(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_missing_unexpected_misshaped_are_named(tiny_dir, tmp_path) -> None:
    def fn(s):
        del s["audio_encoder.blocks.1.mlp.fc2.bias"]
        s["audio_encoder.blocks.0.ls1.gamma"] = torch.ones(64)
        s["audio_projector.net.2.weight"] = torch.zeros(64, 32)

    d = _edit(tiny_dir, tmp_path / "m", fn)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    msg = str(e.value)
    assert "1 missing tensor(s):\n  audio_encoder.blocks.1.mlp.fc2.bias" in msg
    assert "1 unexpected tensor(s):\n  audio_encoder.blocks.0.ls1.gamma" in msg
    assert "audio_projector.net.2.weight: stored [64, 32], config implies [64, 64]" in msg


def test_optional_front_end_buffers(tiny_dir, tmp_path) -> None:
    def fn(s):
        for k in [k for k in s if ".front_end." in k or k.endswith("num_batches_tracked")]:
            del s[k]

    model = MiDashengLM.from_pretrained(_edit(tiny_dir, tmp_path / "m", fn))
    assert model.audio_encoder.init_bn.running_var.shape == (64,)


def test_untied_copy_of_tied_head_is_accepted(tiny_dir, tmp_path) -> None:
    d = _edit(tiny_dir, tmp_path / "m", lambda s: s.__setitem__("decoder.lm_head.weight", s["decoder.model.embed_tokens.weight"].clone()))
    Checkpoint(d)


@pytest.mark.parametrize("gone,match", [("config.json", "config.json: not found"), ("model.safetensors", "no model.safetensors"), ("tokenizer.json", "tokenizer.json: not found")])
def test_missing_files(tiny_dir, tmp_path, gone, match) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / gone).unlink()
    with pytest.raises(CheckpointError, match=match):
        MiDashengLM.from_pretrained(d)


def test_pickle_weights_are_refused(tiny_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(d)


def test_truncated_weights(tiny_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="beyond the end of the file"):
        Checkpoint(d)


def test_shard_index_naming_a_missing_file(tiny_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    names = list(load_file(d / "model.safetensors").keys())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        Checkpoint(d)


def _cfg(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("audio_encoder_config", "embed_dim"), "64", "embed_dim' must be int, got str"),
        (("audio_encoder_config", "depth"), True, "depth' must be int, got bool"),
        (("text_config", "hidden_size"), 64.5, "hidden_size' must be int, got float"),
        (("text_config", "model_type"), "llama", "model_type 'llama' is not supported"),
        (("audio_encoder_config", "hop_length"), 320, "hop_length = 320 is not supported"),
        (("audio_encoder_config", "embed_dim"), 66, "not divisible by num_heads"),
        (("audio_token_id",), 10**6, "outside the decoder vocabulary"),
        (("text_config",), [], "'text_config' must be dict, got list"),
    ],
)
def test_config_values_of_the_wrong_type(tiny_dir, path, value, match) -> None:
    cfg = _cfg(tiny_dir)
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(cfg)


def test_missing_config_key(tiny_dir) -> None:
    cfg = _cfg(tiny_dir)
    del cfg["audio_token_id"]
    with pytest.raises(ConfigError, match="required key 'audio_token_id' is missing"):
        ModelConfig.from_dict(cfg)


def test_config_not_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable as JSON"):
        ModelConfig.from_dir(tmp_path)


def test_audio_token_id_must_match_tokenizer(tiny_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = _cfg(tiny_dir)
    cfg["audio_token_id"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="audio_token_id 5 is not the tokenizer's <\\|AUDIO\\|> id"):
        MiDashengLM.from_pretrained(d)
