"""Export the ``decoder.*`` tensors of an official-layout checkpoint to a llama.cpp GGUF file.

Written with the ``gguf`` package's ``GGUFWriter`` (the library llama.cpp's own converter is
built on; the converter itself is not on PyPI and rejects unknown tokenizer hashes). Tensor
infos are written first and tensor data one tensor at a time, so a 7B decoder converts with one
tensor in memory. Architectures: ``qwen2`` (7B: q/k/v biases, untied ``output``) and ``qwen3``
(0.6B: per-head q/k RMS norms, ``key_length``/``value_length``, tied embeddings without
``output``). Norms and biases stay f32 whatever the output type.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ...runtime import gguf_meta as G
from ...runtime.errors import ConfigError, MdlEdgeError
from ...runtime.prompt import PromptFormat
from .checkpoint import Checkpoint
from .layout import DECODER_PREFIX

logger = logging.getLogger("mdl_edge")

#: checkpoint name (below ``decoder.``) -> GGUF name; ``{i}`` is the layer.
TENSOR_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

OUT_TYPES = G.FULL_PRECISION_TYPES


def gguf_name(name: str) -> str:
    """The GGUF name of a checkpoint tensor name (below ``decoder.``)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        if key in TENSOR_NAMES:
            return TENSOR_NAMES[key].format(i=parts[2])
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    raise MdlEdgeError(f"no GGUF name for decoder tensor {name!r}")


def _vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of tokenizer.json, padded to the embedding rows."""
    import gguf

    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"{model_dir}/tokenizer.json: expected a byte-level BPE model, got {model.get('type')!r}")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for tok, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for t in data.get("added_tokens", []):
        if t["id"] >= n_vocab:
            raise ConfigError(f"tokenizer token {t['content']!r} has id {t['id']} beyond the {n_vocab} embedding rows")
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    filled = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return filled, [int(t) for t in types], merges


@contextmanager
def gguf_output(dst: Path, arch: str) -> Iterator[Any]:
    """A ``GGUFWriter`` for ``dst`` that writes to ``dst.partial`` and moves it into place when
    the block ends, or removes it when the block fails: a GGUF appears complete or not at all."""
    import gguf

    tmp = dst.with_name(dst.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield w
        w.close()
        tmp.replace(dst)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def export_decoder_gguf(checkpoint_dir: str | Path, out_path: str | Path, *, out_type: str = "f16") -> Path:
    """Write the decoder of ``checkpoint_dir`` as GGUF (``out_type``: f32, f16 or bf16)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ConfigError(f"out_type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    ckpt = Checkpoint(checkpoint_dir)
    cfg, dec = ckpt.config, ckpt.config.decoder
    prompt = PromptFormat.from_dir(ckpt.dir)
    out = Path(out_path)
    arch = dec.arch
    with gguf_output(out, arch) as w:
        w.add_name(f"MiDashengLM decoder ({ckpt.dir.name})")
        w.add_context_length(dec.max_position_embeddings)
        w.add_embedding_length(dec.hidden_size)
        w.add_block_count(dec.num_layers)
        w.add_feed_forward_length(dec.intermediate_size)
        w.add_head_count(dec.num_heads)
        w.add_head_count_kv(dec.num_kv_heads)
        w.add_rope_freq_base(dec.rope_theta)
        w.add_layer_norm_rms_eps(dec.rms_norm_eps)
        if arch == "qwen3" or dec.head_dim != dec.hidden_size // dec.num_heads:
            w.add_key_length(dec.head_dim)
            w.add_value_length(dec.head_dim)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]
        w.add_file_type(int(ftype))
        tokens, types, merges = _vocab(ckpt.dir, dec.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        eot = prompt.special.im_end
        w.add_bos_token_id(prompt.special.end_of_text)
        w.add_eos_token_id(eot)
        w.add_eot_token_id(eot)
        w.add_pad_token_id(prompt.special.end_of_text)
        w.add_add_bos_token(False)
        w.add_chat_template(prompt.chat_template)
        w.add_string(G.KEY_SOURCE_HASH, ckpt.source_hash())
        w.add_uint32(G.KEY_AUDIO_TOKEN_ID, cfg.audio_token_id)
        w.add_uint32(G.KEY_AUDIO_BOS_TOKEN_ID, prompt.special.audio_bos)
        w.add_uint32(G.KEY_AUDIO_EOS_TOKEN_ID, prompt.special.audio_eos)
        w.add_uint32(G.KEY_ENCODER_EMBED_DIM, cfg.encoder.embed_dim)

        names = [n for n in ckpt.tensors if n.startswith(DECODER_PREFIX)]
        if dec.tie_word_embeddings:
            names = [n for n in names if n != DECODER_PREFIX + "lm_head.weight"]

        def plan(name: str) -> tuple[np.dtype, "gguf.GGMLQuantizationType"]:
            info = ckpt.tensors[name]
            small = len(info.shape) < 2  # norms and biases
            if out_type == "f32" or small:
                return np.dtype(np.float32), gguf.GGMLQuantizationType.F32
            if out_type == "f16":
                return np.dtype(np.float16), gguf.GGMLQuantizationType.F16
            return np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16

        for name in names:
            shape = ckpt.tensors[name].shape
            dtype, raw = plan(name)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            w.add_tensor_info(gguf_name(name[len(DECODER_PREFIX):]), shape, dtype, nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # data follows the order of the tensor infos: one tensor at a time, read without mmap
        for name in names:
            t = ckpt.read(name)
            dtype, raw = plan(name)
            if raw == gguf.GGMLQuantizationType.BF16:
                arr = t.to(torch.bfloat16).view(torch.uint16).numpy()
            else:
                arr = t.to(torch.float32).numpy().astype(dtype, copy=False)
            w.write_tensor_data(np.ascontiguousarray(arr))
            del t, arr
    logger.info("wrote %s (%s, %d tensors)", out, out_type, len(names))
    return out
