"""The official MiDashengLM tensor layout (spec §4.4) as data: name -> shape, from a config.

Used by the synthetic-checkpoint writer (what to write) and by the checkpoint loader (what to
expect), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime import constants as C
from ..runtime.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the official layout."""

    name: str
    shape: tuple[int, ...]
    kind: str  # how synthetic weights initialise it: see export/synth.py
    optional: bool = False


ENCODER_PREFIX = "audio_encoder."
PROJECTOR_PREFIX = "audio_projector."
DECODER_PREFIX = "decoder."
FRONT_END_BUFFERS = ("audio_encoder.front_end.0.mel_scale.fb", "audio_encoder.front_end.0.spectrogram.window")


def official_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor an official-layout checkpoint for ``cfg`` holds, in checkpoint order."""
    e, d = cfg.encoder, cfg.decoder
    D, M = e.embed_dim, e.mlp_dim
    t: list[TensorSpec] = []
    a = ENCODER_PREFIX
    t += [
        TensorSpec(a + "init_bn.weight", (C.N_MELS,), "norm_weight"),
        TensorSpec(a + "init_bn.bias", (C.N_MELS,), "norm_bias"),
        TensorSpec(a + "init_bn.running_mean", (C.N_MELS,), "bn_mean"),
        TensorSpec(a + "init_bn.running_var", (C.N_MELS,), "bn_var"),
        TensorSpec(a + "init_bn.num_batches_tracked", (), "bn_count", optional=True),
        TensorSpec(a + "patch_embed.proj.weight", (D, 1, *e.patch_size), "linear"),
        TensorSpec(a + "patch_embed.proj.bias", (D,), "bias"),
        TensorSpec(a + "time_pos_embed", (1, D, 1, e.n_time_patches), "pos"),
        TensorSpec(a + "freq_pos_embed", (1, D, 1, 1), "pos"),
    ]
    qkv_bias = [("attn.qkv.bias", (3 * D,), "bias")] if e.qkv_bias else []
    for i in range(e.depth):
        b = f"{a}blocks.{i}."
        for suffix, shape, kind in [
            ("norm1.weight", (D,), "norm_weight"),
            ("norm1.bias", (D,), "norm_bias"),
            ("attn.qkv.weight", (3 * D, D), "linear"),
            *qkv_bias,
            ("attn.proj.weight", (D, D), "linear"),
            ("attn.proj.bias", (D,), "bias"),
            ("norm2.weight", (D,), "norm_weight"),
            ("norm2.bias", (D,), "norm_bias"),
            ("mlp.fc1.weight", (M, D), "linear"),
            ("mlp.fc1.bias", (M,), "bias"),
            ("mlp.fc2.weight", (D, M), "linear"),
            ("mlp.fc2.bias", (D,), "bias"),
        ]:
            t.append(TensorSpec(b + suffix, shape, kind))
    t += [
        TensorSpec(a + "norm.weight", (D,), "norm_weight"),
        TensorSpec(a + "norm.bias", (D,), "norm_bias"),
        TensorSpec(FRONT_END_BUFFERS[0], (C.N_FREQS, C.N_MELS), "mel_fb", optional=True),
        TensorSpec(FRONT_END_BUFFERS[1], (C.WIN_LENGTH,), "hann", optional=True),
    ]
    H, p = d.hidden_size, PROJECTOR_PREFIX
    t += [
        TensorSpec(p + "net.0.weight", (H, cfg.projector_in), "linear"),
        TensorSpec(p + "net.0.bias", (H,), "bias"),
        TensorSpec(p + "net.2.weight", (H, H), "linear"),
        TensorSpec(p + "net.2.bias", (H,), "bias"),
    ]
    q_out, kv_out = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    m = DECODER_PREFIX + "model."
    t.append(TensorSpec(m + "embed_tokens.weight", (d.vocab_size, H), "embedding"))
    for i in range(d.num_layers):
        b = f"{m}layers.{i}."
        layer = [
            ("input_layernorm.weight", (H,), "rms_weight"),
            ("self_attn.q_proj.weight", (q_out, H), "linear"),
            ("self_attn.k_proj.weight", (kv_out, H), "linear"),
            ("self_attn.v_proj.weight", (kv_out, H), "linear"),
            ("self_attn.o_proj.weight", (H, q_out), "linear"),
            ("post_attention_layernorm.weight", (H,), "rms_weight"),
            ("mlp.gate_proj.weight", (d.intermediate_size, H), "linear"),
            ("mlp.up_proj.weight", (d.intermediate_size, H), "linear"),
            ("mlp.down_proj.weight", (H, d.intermediate_size), "linear"),
        ]
        if d.attention_bias:
            layer += [
                ("self_attn.q_proj.bias", (q_out,), "bias"),
                ("self_attn.k_proj.bias", (kv_out,), "bias"),
                ("self_attn.v_proj.bias", (kv_out,), "bias"),
            ]
        if d.arch == "qwen3":
            layer += [("self_attn.q_norm.weight", (d.head_dim,), "rms_weight"), ("self_attn.k_norm.weight", (d.head_dim,), "rms_weight")]
        t += [TensorSpec(b + s, shape, kind) for s, shape, kind in layer]
    t.append(TensorSpec(m + "norm.weight", (H,), "rms_weight"))
    # A tied head is the embedding matrix; some checkpoints still store a copy, so accept it.
    t.append(TensorSpec(DECODER_PREFIX + "lm_head.weight", (d.vocab_size, H), "linear", optional=d.tie_word_embeddings))
    return t
