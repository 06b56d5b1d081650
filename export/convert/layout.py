"""The official MiDashengLM tensor layout (spec §4.4, §6.4) as data: name -> shape, from a config.

Used by the synthetic-checkpoint writer (what to write) and by the checkpoint loader (what to
expect), so the two can never disagree. Names here are *canonical*: the module names of the
PyTorch reference. :data:`NAME_LAYOUTS` lists the ways a checkpoint may spell them; a newly
confirmed official spelling is one more row there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...runtime import constants as C
from ...runtime.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the official layout."""

    name: str
    shape: tuple[int, ...]
    kind: str  # how synthetic weights initialise it: see export/synthetic/checkpoint.py
    optional: bool = False


ENCODER_PREFIX = "audio_encoder."
PROJECTOR_PREFIX = "audio_projector."
DECODER_PREFIX = "decoder."
#: where the semantic Dasheng encoder sits inside a DashengTokenizer-style encoder
TOKENIZER_SEMANTIC_PREFIX = ENCODER_PREFIX + "model."
#: torchaudio front-end buffers some checkpoints carry: (window, filterbank) names after the
#: encoder prefix, per front end. They are checked against the spec's values, never used.
SEMANTIC_FRONT_END = ("front_end.0.spectrogram.window", "front_end.0.mel_scale.fb")
ACOUSTIC_FRONT_END = ("front_end.mel_spec.spectrogram.window", "front_end.mel_spec.mel_scale.fb")


@dataclass(frozen=True)
class NameLayout:
    """One spelling of the canonical tensor names: ``renames`` maps a stored name prefix to the
    canonical prefix it stands for (names without a matching prefix are stored as they are)."""

    name: str
    variant: str  # EncoderConfig.variant it applies to
    renames: tuple[tuple[str, str], ...]
    seen_in: str

    def canonical(self, stored: str) -> str:
        """The canonical name of a name as this layout stores it."""
        for prefix, canon in self.renames:
            if stored.startswith(prefix):
                return canon + stored[len(prefix):]
        return stored

    def stored(self, canonical: str) -> str:
        """How this layout stores a canonical name (the inverse of :meth:`canonical`)."""
        for prefix, canon in self.renames:
            if canonical.startswith(canon):
                return prefix + canonical[len(canon):]
        return canonical


NAME_LAYOUTS: tuple[NameLayout, ...] = (
    NameLayout("midashenglm", "dasheng", (), "MiDashengLM-7B checkpoints (spec §4.4)"),
    NameLayout(
        "dashengtokenizer", "dasheng_tokenizer", (),
        "DashengTokenizerEncoder under audio_encoder. with the semantic encoder's BatchNorm as a plain module",
    ),
    NameLayout(
        "dashengtokenizer-sequential-bn", "dasheng_tokenizer", ((TOKENIZER_SEMANTIC_PREFIX + "init_bn.1.", TOKENIZER_SEMANTIC_PREFIX + "init_bn."),),
        "the public DashengTokenizer code (init_bn = Sequential(Rearrange, BatchNorm2d, Rearrange))",
    ),
)


def name_layout(name: str) -> NameLayout:
    """The row of :data:`NAME_LAYOUTS` called ``name``."""
    for row in NAME_LAYOUTS:
        if row.name == name:
            return row
    raise KeyError(f"no name layout {name!r}; known: {', '.join(r.name for r in NAME_LAYOUTS)}")


def front_end_buffer_names(cfg: ModelConfig) -> dict[str, int]:
    """Canonical names of the optional front-end buffers of ``cfg``'s encoder, each mapped to the
    acoustic bin count of its front end (0: the semantic mel)."""
    e = cfg.encoder
    semantic = TOKENIZER_SEMANTIC_PREFIX if e.variant == "dasheng_tokenizer" else ENCODER_PREFIX
    names = {semantic + n: 0 for n in SEMANTIC_FRONT_END}
    if e.variant == "dasheng_tokenizer":
        names.update({ENCODER_PREFIX + n: int(e.acoustic_mels or 0) for n in ACOUSTIC_FRONT_END})
    return names


def semantic_prefix(cfg: ModelConfig) -> str:
    """Where the semantic Dasheng encoder's tensors sit."""
    return TOKENIZER_SEMANTIC_PREFIX if cfg.encoder.variant == "dasheng_tokenizer" else ENCODER_PREFIX


def official_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor an official-layout checkpoint for ``cfg`` holds, in checkpoint order
    (canonical names). ``cfg.encoder.acoustic_mels`` must be known (not ``None``)."""
    e, d = cfg.encoder, cfg.decoder
    D, M = e.embed_dim, e.mlp_dim
    if e.acoustic_mels is None:
        raise ValueError("official_tensors: the acoustic bin count is not known yet")
    t: list[TensorSpec] = []
    a = semantic_prefix(cfg)
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
        TensorSpec(a + SEMANTIC_FRONT_END[1], (C.N_FREQS, C.N_MELS), "mel_fb", optional=True),
        TensorSpec(a + SEMANTIC_FRONT_END[0], (C.WIN_LENGTH,), "hann", optional=True),
    ]
    if e.variant == "dasheng_tokenizer":
        n, b = e.acoustic_mels, ENCODER_PREFIX
        t += [
            TensorSpec(b + ACOUSTIC_FRONT_END[1], (C.ACOUSTIC_N_FREQS, n), "acoustic_mel_fb", optional=True),
            TensorSpec(b + ACOUSTIC_FRONT_END[0], (C.ACOUSTIC_N_FFT,), "acoustic_hann", optional=True),
            TensorSpec(b + "patch_embed.weight", (D, 1, n, C.PATCH_FRAMES), "linear"),
            TensorSpec(b + "patch_embed.bias", (D,), "bias"),
            TensorSpec(b + "norm.weight", (D,), "norm_weight"),
            TensorSpec(b + "norm.bias", (D,), "norm_bias"),
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
