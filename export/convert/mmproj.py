"""The llama.cpp mmproj file of MiDashengLM's audio tower, as the authors' llama.cpp fork names it
(spec §6.2, §6.4): metadata keys and tensor names as tables, a writer and a reader sharing them.

Two projector types: ``midashenglm`` (plain Dasheng, the 7B) and ``midashenglm_dasheng_tokenizer``
(the DashengTokenizer-style encoder with its acoustic branch, the 0.6B). The file stores the
encoder with BatchNorm folded into a per-bin scale and shift and ``freq_pos_embed`` folded into
the time-position table (the fork's graph adds only that table); the reader turns it back into
the PyTorch reference modules, which is what the ONNX exporter traces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...runtime import constants as C
from ...runtime.config import EncoderConfig
from ...runtime.errors import CheckpointError
from ...runtime.gguf_meta import read_gguf_metadata
from ..reference.encoder import AudioProjector, DashengTokenizerEncoder, build_audio_encoder

logger = logging.getLogger("mdl_edge")

PROJECTOR_TYPES = {"midashenglm": "dasheng", "midashenglm_dasheng_tokenizer": "dasheng_tokenizer"}
BN_EPS = 1e-5  # the encoder's BatchNorm eps (PyTorch's default), folded away in the file

# Metadata keys of the fork's clip loader (clip-impl.h).
KEY_ARCH = "general.architecture"
KEY_PROJECTOR_TYPE = "clip.projector_type"
KEY_AUDIO_PROJECTOR_TYPE = "clip.audio.projector_type"
KEY_HAS_AUDIO = "clip.has_audio_encoder"
KEY_HAS_VISION = "clip.has_vision_encoder"
A = "clip.audio."
KEY_EMBED = A + "embedding_length"
KEY_FFN = A + "feed_forward_length"
KEY_BLOCKS = A + "block_count"
KEY_PROJ_DIM = A + "projection_dim"
KEY_HEADS = A + "attention.head_count"
KEY_LN_EPS = A + "attention.layer_norm_epsilon"
KEY_MELS = A + "num_mel_bins"
KEY_MELS_ACOUSTIC = A + "num_mel_bins_acoustic"
KEY_STACK = A + "projector.stack_factor"
KEY_TARGET = A + "target_length"
KEY_PATCH_SIZE = A + "patch_size"
KEY_PATCH_STRIDE = A + "patch_stride"

#: fork tensor name -> reference module name (below the encoder, or ``projector.`` for the
#: projector); ``{i}`` is the block. ``a.init_bn.*`` and ``a.position_embd.weight`` are folded
#: forms handled by the reader and writer themselves.
TENSOR_NAMES: dict[str, str] = {
    "a.patch_embd.weight": "patch_embed.proj.weight",
    "a.patch_embd.bias": "patch_embed.proj.bias",
    "a.blk.{i}.ln1.weight": "blocks.{i}.norm1.weight",
    "a.blk.{i}.ln1.bias": "blocks.{i}.norm1.bias",
    "a.blk.{i}.attn_qkv.weight": "blocks.{i}.attn.qkv.weight",
    "a.blk.{i}.attn_qkv.bias": "blocks.{i}.attn.qkv.bias",
    "a.blk.{i}.attn_out.weight": "blocks.{i}.attn.proj.weight",
    "a.blk.{i}.attn_out.bias": "blocks.{i}.attn.proj.bias",
    "a.blk.{i}.ln2.weight": "blocks.{i}.norm2.weight",
    "a.blk.{i}.ln2.bias": "blocks.{i}.norm2.bias",
    "a.blk.{i}.ffn_up.weight": "blocks.{i}.mlp.fc1.weight",
    "a.blk.{i}.ffn_up.bias": "blocks.{i}.mlp.fc1.bias",
    "a.blk.{i}.ffn_down.weight": "blocks.{i}.mlp.fc2.weight",
    "a.blk.{i}.ffn_down.bias": "blocks.{i}.mlp.fc2.bias",
    "a.post_ln.weight": "norm.weight",
    "a.post_ln.bias": "norm.bias",
    "mm.0.weight": "projector.net.0.weight",
    "mm.0.bias": "projector.net.0.bias",
    "mm.2.weight": "projector.net.2.weight",
    "mm.2.bias": "projector.net.2.bias",
}
#: the acoustic branch (tokenizer variant): fork name -> module name below the tokenizer encoder
ACOUSTIC_TENSOR_NAMES = {
    "a.acoustic.patch_embd.weight": "patch_embed.weight",
    "a.acoustic.patch_embd.bias": "patch_embed.bias",
    "a.acoustic.post_ln.weight": "norm.weight",
    "a.acoustic.post_ln.bias": "norm.bias",
}
SPLIT_QKV = ("a.blk.{i}.attn_q.", "a.blk.{i}.attn_k.", "a.blk.{i}.attn_v.")


@dataclass(frozen=True)
class AudioTower:
    """An audio encoder and projector read from an mmproj file, as reference modules."""

    encoder: torch.nn.Module
    projector: AudioProjector
    config: EncoderConfig
    hidden_size: int
    projector_type: str


def _semantic(encoder: torch.nn.Module) -> torch.nn.Module:
    return encoder.model if isinstance(encoder, DashengTokenizerEncoder) else encoder


def write_mmproj(encoder: torch.nn.Module, projector: AudioProjector, path: str | Path, *, dtype: str = "f16") -> Path:
    """Write reference modules as a fork-style mmproj GGUF: weights of 2+ dimensions in ``dtype``
    (``f32``, ``f16``, ``bf16`` or ``q8_0``), norms, biases and the folded tables in f32."""
    import gguf

    from .gguf_decoder import gguf_output

    sem = _semantic(encoder)
    cfg: EncoderConfig = sem.cfg
    tok = isinstance(encoder, DashengTokenizerEncoder)
    ptype = "midashenglm_dasheng_tokenizer" if tok else "midashenglm"
    with gguf_output(Path(path), "clip") as w:
        w.add_bool(KEY_HAS_AUDIO, True)
        w.add_bool(KEY_HAS_VISION, False)
        w.add_string(KEY_PROJECTOR_TYPE, ptype)
        w.add_string(KEY_AUDIO_PROJECTOR_TYPE, ptype)
        w.add_uint32(KEY_EMBED, cfg.embed_dim)
        w.add_uint32(KEY_FFN, cfg.mlp_dim)
        w.add_uint32(KEY_BLOCKS, cfg.depth)
        w.add_uint32(KEY_HEADS, cfg.num_heads)
        w.add_uint32(KEY_PROJ_DIM, projector.net[2].out_features)
        w.add_float32(KEY_LN_EPS, 1e-6)
        w.add_uint32(KEY_MELS, C.N_MELS)
        w.add_uint32(KEY_STACK, projector.k)
        w.add_uint32(KEY_TARGET, C.CHUNK_FRAMES)
        w.add_array(KEY_PATCH_SIZE, list(cfg.patch_size))
        w.add_array(KEY_PATCH_STRIDE, list(cfg.patch_stride))
        if tok:
            w.add_uint32(KEY_MELS_ACOUSTIC, int(cfg.acoustic_mels or 0))
        state = {k: v.detach().float() for k, v in sem.state_dict().items()}
        bn_scale = state["init_bn.weight"] / torch.sqrt(state["init_bn.running_var"] + BN_EPS)
        tensors: dict[str, torch.Tensor] = {
            "a.init_bn.scale": bn_scale,
            "a.init_bn.shift": state["init_bn.bias"] - state["init_bn.running_mean"] * bn_scale,
            "a.position_embd.weight": (state["time_pos_embed"][0, :, 0, :] + state["freq_pos_embed"][0, :, 0, :]).T,
        }
        proj = {f"projector.{k}": v.detach().float() for k, v in projector.state_dict().items()}
        for fork, ours in TENSOR_NAMES.items():
            for i in range(cfg.depth) if "{i}" in fork else [None]:
                key = ours.format(i=i)
                tensors[fork.format(i=i)] = proj[key] if key.startswith("projector.") else state[key]
        if tok:
            acoustic = {k: v.detach().float() for k, v in encoder.state_dict().items()}
            tensors.update({fork: acoustic[ours] for fork, ours in ACOUSTIC_TENSOR_NAMES.items()})
        for name, t in tensors.items():
            arr = t.contiguous().numpy()
            if arr.ndim < 2 or name in ("a.position_embd.weight",) or dtype == "f32":
                w.add_tensor(name, arr.astype(np.float32))
            elif dtype == "f16":
                w.add_tensor(name, arr.astype(np.float16))
            elif dtype == "bf16":
                w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), raw_dtype=gguf.GGMLQuantizationType.BF16)
            elif dtype == "q8_0" and arr.shape[-1] % 32 == 0:
                w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(name, arr.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return Path(path)


def _field(reader: Any, key: str, path: Path, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise CheckpointError(f"{path}: key {key!r} is missing (not an mmproj of MiDashengLM's audio tower)")
        return default
    return f.contents()


def _int(reader: Any, key: str, path: Path, default: Any = ...) -> int:
    v = _field(reader, key, path, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise CheckpointError(f"{path}: key {key!r} must be a positive integer, got {v!r}")
    return int(v)


def projector_type(meta: dict[str, object], path: Path) -> str:
    """The audio projector type of an mmproj's metadata (read with ``read_gguf_metadata``); a
    vision-only or foreign mmproj is refused naming the key."""
    if meta.get(KEY_ARCH) != "clip":
        raise CheckpointError(f"{path}: {KEY_ARCH} is {meta.get(KEY_ARCH)!r}, not 'clip' (not an mmproj file)")
    if meta.get(KEY_HAS_AUDIO) is not True:
        raise CheckpointError(f"{path}: {KEY_HAS_AUDIO} is {meta.get(KEY_HAS_AUDIO)!r}: this mmproj has no audio encoder (a vision projector?)")
    ptype = meta.get(KEY_AUDIO_PROJECTOR_TYPE, meta.get(KEY_PROJECTOR_TYPE))
    if ptype not in PROJECTOR_TYPES:
        raise CheckpointError(
            f"{path}: {KEY_AUDIO_PROJECTOR_TYPE} is {ptype!r}; MiDashengLM's are {', '.join(sorted(PROJECTOR_TYPES))}"
        )
    return str(ptype)


def read_mmproj(path: str | Path) -> AudioTower:
    """The audio tower of a fork-style mmproj GGUF as fp32 reference modules (F32, F16, BF16 and
    Q8_0 tensors dequantized with ``gguf``; split or fused qkv). Every tensor is checked by name
    and shape; a missing, unexpected or mis-shaped one is refused with its name."""
    import gguf

    p = Path(path)
    ptype = projector_type(read_gguf_metadata(p), p)
    reader = gguf.GGUFReader(str(p))
    d, depth, heads = _int(reader, KEY_EMBED, p), _int(reader, KEY_BLOCKS, p), _int(reader, KEY_HEADS, p)
    ffn, hidden = _int(reader, KEY_FFN, p), _int(reader, KEY_PROJ_DIM, p)
    fixed = {KEY_MELS: C.N_MELS, KEY_STACK: C.SUBSAMPLE, KEY_TARGET: C.CHUNK_FRAMES}
    for key, want in fixed.items():
        got = _int(reader, key, p, want)
        if got != want:
            raise CheckpointError(f"{p}: {key} is {got}; MiDashengLM uses {want}")
    for key in (KEY_PATCH_SIZE, KEY_PATCH_STRIDE):
        got = [int(x) for x in _field(reader, key, p, [C.N_MELS, C.PATCH_FRAMES])]
        if got != [C.N_MELS, C.PATCH_FRAMES]:
            raise CheckpointError(f"{p}: {key} is {got}; MiDashengLM uses {[C.N_MELS, C.PATCH_FRAMES]}")
    eps = float(_field(reader, KEY_LN_EPS, p, 1e-6))
    if abs(eps - 1e-6) > 1e-9:
        raise CheckpointError(f"{p}: {KEY_LN_EPS} is {eps}; the Dasheng encoder uses 1e-6")
    if d % heads or ffn % d:
        raise CheckpointError(f"{p}: {KEY_EMBED} {d}, {KEY_HEADS} {heads}, {KEY_FFN} {ffn} do not make a Dasheng encoder")
    acoustic = _int(reader, KEY_MELS_ACOUSTIC, p) if PROJECTOR_TYPES[ptype] == "dasheng_tokenizer" else 0
    cfg = EncoderConfig(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=ffn / d, qkv_bias=True,
                        patch_size=(C.N_MELS, C.PATCH_FRAMES), patch_stride=(C.N_MELS, C.PATCH_FRAMES), n_mels=C.N_MELS,
                        target_length=C.CHUNK_FRAMES, acoustic_mels=acoustic)
    stored = {t.name: t for t in reader.tensors}

    def take(name: str) -> torch.Tensor:
        t = stored.pop(name, None)
        if t is None:
            raise CheckpointError(f"{p}: tensor {name!r} is missing")
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape([int(x) for x in reversed(t.shape)])

    encoder = build_audio_encoder(cfg)
    projector = AudioProjector(d, hidden, C.SUBSAMPLE)
    sem = _semantic(encoder)
    state: dict[str, torch.Tensor] = {}
    scale, shift = take("a.init_bn.scale"), take("a.init_bn.shift")
    state.update({"init_bn.weight": scale, "init_bn.bias": shift, "init_bn.running_mean": torch.zeros_like(scale),
                  "init_bn.running_var": torch.full_like(scale, 1.0 - BN_EPS), "init_bn.num_batches_tracked": torch.tensor(0)})
    pos = take("a.position_embd.weight")  # [252, D], frequency position folded in
    state["time_pos_embed"] = pos.T.reshape(1, d, 1, -1)
    state["freq_pos_embed"] = torch.zeros(1, d, 1, 1)
    proj_state: dict[str, torch.Tensor] = {}
    for fork, ours in TENSOR_NAMES.items():
        for i in range(depth) if "{i}" in fork else [None]:
            name, key = fork.format(i=i), ours.format(i=i)
            if "attn_qkv" in fork and name not in stored:
                part = fork.rsplit(".", 1)[1]
                name_parts = [s.format(i=i) + part for s in SPLIT_QKV]
                value = torch.cat([take(n) for n in name_parts])
            else:
                value = take(name)
            if key.startswith("projector."):
                proj_state[key[len("projector."):]] = value
            else:
                state[key] = value
    _load(sem, state, p)
    _load(projector, proj_state, p)
    if isinstance(encoder, DashengTokenizerEncoder):
        _load(encoder, {ours: take(fork) for fork, ours in ACOUSTIC_TENSOR_NAMES.items()}, p, strict=False)
    if stored:
        raise CheckpointError(f"{p}: unexpected tensor(s) for a {ptype} mmproj: {', '.join(sorted(stored)[:10])}")
    return AudioTower(encoder.eval(), projector.eval(), cfg, hidden, ptype)


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, *, strict: bool = True) -> None:
    own = module.state_dict()
    for k, v in state.items():
        if k not in own:
            raise CheckpointError(f"{path}: no place for tensor {k!r}")
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor for {k} has shape {list(v.shape)}, the keys imply {list(own[k].shape)}")
    module.load_state_dict(state, strict=strict)
