"""Synthetic MiDashengLM checkpoints in the official Hugging Face layout (random weights).

``write_synthetic_checkpoint(preset, out)`` writes config.json, generation_config.json, the
tokenizer files and safetensors shards (with an index when sharded) whose tensor names and
shapes are exactly those of the official checkpoints (spec §4.4). Weights are random but
initialised like the real models so activations have realistic scale; every tensor is drawn
from its own generator seeded by (seed, tensor name), so the result is deterministic for a
seed whatever the sharding. Large presets are written one shard at a time: the whole model is
never in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...runtime import constants as C
from ...runtime.config import ModelConfig
from ...runtime.errors import ConfigError, MdlEdgeError
from ...runtime.mel import hann_window, mel_filterbank
from ..convert.layout import TensorSpec, name_layout, official_tensors
from .tokenizer import write_tokenizer_files
from ..toy.world import corpus as toy_corpus

logger = logging.getLogger("mdl_edge")

OFFICIAL_SPECIAL_START = 151643  # <|endoftext|> in the Qwen2 / Qwen2.5-Omni vocabularies


def _encoder_config(embed_dim: int, depth: int, num_heads: int, acoustic_mels: int = 0) -> dict[str, Any]:
    """``audio_encoder_config``: plain Dasheng, or with ``acoustic_mels`` a DashengTokenizer-style
    encoder (its config's ``n_mels_patch``; ``hop_length`` is shared by both mels)."""
    extra = {"n_mels_patch": acoustic_mels} if acoustic_mels else {}
    return {
        "model_type": "dashengtokenizer" if acoustic_mels else "midashenglm_dasheng_encoder",
        **extra,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "init_values": None,
        "patch_size": [C.N_MELS, C.PATCH_FRAMES],
        "patch_stride": [C.N_MELS, C.PATCH_FRAMES],
        "input_channels": 1,
        "target_length": C.CHUNK_FRAMES,
        "n_mels": C.N_MELS,
        "n_fft": C.N_FFT,
        "win_length": C.WIN_LENGTH,
        "hop_length": C.HOP_LENGTH,
        "sample_rate": C.SAMPLE_RATE,
        "f_min": C.F_MIN,
        "f_max": C.F_MAX,
        "center": True,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "outputdim": 527,
    }


def _qwen3(hidden: int, layers: int, heads: int, kv: int, head_dim: int, inter: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 40960,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _qwen2_omni(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int) -> dict[str, Any]:
    # The 7B decoder's text_config is a Qwen2.5-Omni thinker text config: Qwen2 architecture, with
    # an mrope section that is plain 1-D RoPE for audio+text input (spec §4.1).
    return {
        "model_type": "qwen2_5_omni_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


@dataclass(frozen=True)
class Preset:
    """Shapes and storage of one synthetic checkpoint family."""

    name: str
    encoder: dict[str, Any]
    text: dict[str, Any]
    base_vocab: int  # BPE entries to train (at most)
    special_start: int  # id of <|endoftext|>; the six special tokens follow it
    dtype: torch.dtype
    max_shard_bytes: int
    description: str
    corpus: tuple[str, ...] = ()  # extra lines for the tokenizer's BPE training
    layout: str = "midashenglm"  # the NameLayout row its tensor names are written in


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny", _encoder_config(64, 2, 4), _qwen3(64, 2, 4, 2, 16, 128, 1024), 1000, 1000, torch.float32, 2**31,
            "seconds to build: 2-layer 64-d encoder, 2-layer Qwen3-style decoder (tied, q/k norms)",
        ),
        Preset(
            "tiny-qwen2", _encoder_config(64, 2, 4), _qwen2_omni(64, 2, 4, 2, 128, 1024), 1000, 1000, torch.float32, 2**31,
            "like tiny, with the 7B's Qwen2 decoder layout (untied head, q/k/v biases, Omni text config)",
        ),
        Preset(
            "toy", _encoder_config(128, 3, 4, acoustic_mels=100), _qwen3(256, 3, 4, 2, 64, 768, 1024), 1000, 1000, torch.float32, 2**31,
            "the trainable toy model's shapes: MiDashengLM-0.6B's architecture at toy size (128-d 3-layer DashengTokenizer-style "
            "encoder with a 100-bin acoustic branch, 256-d 3-layer Qwen3-style decoder); `mdl-edge train-toy` trains it to hear the toy world",
            tuple(toy_corpus()), layout="dashengtokenizer",
        ),
        Preset(
            "tiny-tok", _encoder_config(64, 2, 4, acoustic_mels=100), _qwen3(64, 2, 4, 2, 16, 128, 1024), 1000, 1000, torch.float32,
            2**31, "like tiny, with the 0.6B's DashengTokenizer-style encoder (100-bin acoustic branch), named as the public code names it",
            layout="dashengtokenizer-sequential-bn",
        ),
        Preset(
            "0.6b", _encoder_config(768, 12, 12, acoustic_mels=100), _qwen3(1024, 28, 16, 8, 128, 3072, 151936), 8000,
            OFFICIAL_SPECIAL_START, torch.float32, 2**31,
            "MiDashengLM-0.6B as best known: DashengTokenizer-style encoder (Dasheng-base 768-d, 12 layers, 12 heads + "
            "100-bin acoustic branch), projector 3840 -> 1024 -> 1024, Qwen3-0.6B decoder; fp32 (about 3 GB)",
            layout="dashengtokenizer-sequential-bn",
        ),
        Preset(
            "0.6b-dasheng-1280", _encoder_config(1280, 32, 16), _qwen3(1024, 28, 16, 8, 128, 3072, 151936), 8000, OFFICIAL_SPECIAL_START,
            torch.float32, 2**31, "the 7B's Dasheng-0.6B encoder (1280-d, 32 layers) + Qwen3-0.6B decoder shapes, fp32 (about 5 GB)",
        ),
        Preset(
            "7b", _encoder_config(1280, 32, 16), _qwen2_omni(3584, 28, 28, 4, 18944, 152064), 8000, OFFICIAL_SPECIAL_START,
            torch.bfloat16, 4 * 2**30, "Dasheng-0.6B encoder + Qwen2-7B decoder shapes, bf16 on disk (about 17 GB)",
        ),
    ]
}


def preset_config(preset: str) -> dict[str, Any]:
    """The official-structure config.json of a preset."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    return {
        "architectures": ["MiDashengLMModel"],
        "model_type": "midashenglm",
        "auto_map": {
            "AutoConfig": "configuration_midashenglm.MiDashengLMConfig",
            "AutoModelForCausalLM": "modeling_midashenglm.MiDashengLMModel",
        },
        "audio_encoder_config": copy.deepcopy(p.encoder),
        "subsample_factor": C.SUBSAMPLE,
        "text_config": copy.deepcopy(p.text),
        "audio_token_id": p.special_start + 3,  # <|AUDIO|>
        "torch_dtype": "bfloat16" if p.dtype == torch.bfloat16 else "float32",
        "transformers_version": "4.57.1",
        "mdl_edge_synthetic": {"preset": p.name, "note": "random weights; generated by mdl-edge synth"},
    }


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def synthetic_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One tensor, initialised like the real model's (HF-like std 0.02 normals, norms near 1)."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))

    def randn() -> torch.Tensor:
        return torch.randn(spec.shape, generator=g, dtype=torch.float32)

    kind = spec.kind
    if kind in ("linear", "embedding", "pos"):
        x = randn() * 0.02
    elif kind == "bias":
        x = randn() * 0.02  # non-zero so that a loader dropping biases is caught by parity tests
    elif kind in ("norm_weight", "rms_weight"):
        x = 1.0 + randn() * 0.05
    elif kind == "norm_bias":
        x = randn() * 0.02
    elif kind == "bn_mean":
        x = -45.0 + randn() * 8.0  # log-mel dB of real audio: tens of dB below 0
    elif kind == "bn_var":
        x = (14.0 * torch.exp(randn() * 0.2)) ** 2  # per-bin std around 14 dB
    elif kind == "bn_count":
        return torch.tensor(120_000, dtype=torch.int64)
    elif kind == "mel_fb":
        x = torch.from_numpy(mel_filterbank()).float()
    elif kind == "hann":
        x = torch.from_numpy(hann_window()).float()
    elif kind == "acoustic_mel_fb":
        x = torch.from_numpy(mel_filterbank(C.ACOUSTIC_N_FREQS, spec.shape[1])).float()
    elif kind == "acoustic_hann":
        x = torch.from_numpy(hann_window(C.ACOUSTIC_N_FFT)).float()
    else:
        raise ValueError(f"no initialiser for tensor kind {kind!r} ({spec.name})")
    return x.to(dtype).contiguous()


def _written_tensors(cfg: ModelConfig, layout: str) -> list[TensorSpec]:
    """What a preset stores, under the names of its layout: official checkpoints carry the BN
    counter and (0804-fp32) the front-end buffers; a tied head is not stored."""
    row = name_layout(layout)
    return [dataclasses.replace(s, name=row.stored(s.name)) for s in official_tensors(cfg) if not (s.optional and s.name.endswith("lm_head.weight"))]


def _plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = int(torch.tensor(s.shape).prod().item()) if s.shape else 1
        nbytes = n * (8 if s.kind == "bn_count" else torch.empty((), dtype=dtype).element_size())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_synthetic_checkpoint(
    preset: str, out: str | Path, *, seed: int = 0, overwrite: bool = False, max_shard_bytes: int | None = None
) -> Path:
    """Write a synthetic checkpoint of ``preset`` into folder ``out`` and return its path.

    The folder appears complete or not at all: everything is written into a hidden sibling
    folder which is renamed into place at the end. An existing non-empty ``out`` is refused
    unless ``overwrite``. ``max_shard_bytes`` overrides the preset's shard size.
    """
    from safetensors.torch import save_file

    cfg_dict = preset_config(preset)
    p = PRESETS[preset]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: already exists and is not empty (pass overwrite=True / --force to replace it)")
    parent = out.resolve().parent
    tmp = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise MdlEdgeError(f"{out}: cannot create the output folder: {e.strerror or e}") from e
    try:
        cfg = ModelConfig.from_dict(cfg_dict, source=f"preset {preset}")
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n", encoding="utf-8")
        s0 = p.special_start
        gen = {
            "bos_token_id": s0,
            "eos_token_id": [s0 + 2, s0],  # <|im_end|>, <|endoftext|>
            "pad_token_id": s0,
            "do_sample": False,
            "transformers_version": "4.57.1",
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        write_tokenizer_files(
            tmp, base_vocab=p.base_vocab, special_start=s0, seed=seed, model_max_length=cfg.decoder.max_position_embeddings, corpus=p.corpus
        )
        shards = _plan_shards(_written_tensors(cfg, p.layout), p.dtype, max_shard_bytes or p.max_shard_bytes)
        weight_map: dict[str, str] = {}
        total = 0
        for k, shard in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {s.name: synthetic_tensor(s, seed, p.dtype) for s in shard}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({s.name: name for s in shard})
            logger.info("wrote %s (%d tensors)", name, len(shard))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
