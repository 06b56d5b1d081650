"""The decoder's prompt pass as an ONNX graph (the prompt engine, ``runtime/prefill.py``), built
from a GGUF decoder's own tensors.

llama.cpp evaluates a short prompt far below this machine's matrix rate (its quantized kernels
are starved at a few dozen positions, and its AMX path is off, llama.cpp issue #20824), while
ONNX Runtime's int8 MatMul runs the pass 2-3x faster. So the prompt's keys and values are
computed by this graph and handed to llama.cpp's KV cache (``runtime/kv_state.py``); llama.cpp
evaluates only the prompt's last position and generates as before.

The graph takes the prompt rows (text tokens as their ``token_embd`` rows, audio as its
embeddings), the position of the first row, and each layer's keys and values of the positions
before it (possibly none) as inputs of their own; it returns each layer's keys (after the
per-head norm and RoPE, as llama.cpp caches them) and values for the new rows as outputs of their
own (``runtime/prefill.py`` ``layer_inputs`` / ``layer_outputs``), so the runtime binds both
straight to the buffer llama.cpp reads. The last layer's attention output and MLP feed nothing
that is cached, so they are left out. Weights are read from the GGUF (any type ``gguf`` can
dequantize), so a checkpoint and the official GGUF pair take one path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...runtime.errors import CheckpointError
from ...runtime.gguf_meta import KEY_ARCHITECTURE, KEY_SOURCE_HASH
from ...runtime.onnx_meta import write_metadata
from ...runtime.prefill import KV_DTYPES, layer_inputs, layer_outputs
from .onnx_encoder import OPSET, export_graph

logger = logging.getLogger("mdl_edge")

# GGUF tensor names of one decoder block (llama.cpp's names for Qwen2/Qwen3); optional ones may be absent.
BLOCK_TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight", "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight", "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight",
}
OPTIONAL_TENSORS = {
    "q_bias": "blk.{i}.attn_q.bias", "k_bias": "blk.{i}.attn_k.bias", "v_bias": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight",
}


@dataclass(frozen=True)
class DecoderShape:
    """What the prompt graph needs of a decoder's hyperparameters (read from its GGUF)."""

    arch: str
    n_layer: int
    hidden: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_base: float

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    def metadata(self) -> dict[str, Any]:
        return {"arch": self.arch, "n_layer": self.n_layer, "hidden_size": self.hidden, "n_head": self.n_head,
                "n_head_kv": self.n_head_kv, "head_dim": self.head_dim, "kv_dim": self.kv_dim,
                "rms_eps": self.rms_eps, "rope_base": self.rope_base}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # written x / sqrt(...), the form ONNX Runtime fuses into one SimplifiedLayerNormalization
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class PrefillGraph(nn.Module):
    """Prompt rows -> every layer's keys and values (see the module docstring).

    Laid out for ONNX Runtime's CPU kernels: the query heads that share a key/value head are
    attended as one batch, so keys and values are never repeated per head; the attention scale
    rides on the queries' RoPE tables. Each projection stays a product of its own: fused q/k/v and
    gate/up products ran no faster and their split outputs are extra buffers ONNX Runtime's
    memory plan keeps for the whole run (7 MB on a 168-position prompt).
    ``blocks`` are emptied as they are taken, so the fp32 weights are not held twice.
    ``kv_dtype``: the type of the cached keys and values in and out (the KV cache's; float16 saves
    the runtime a conversion that costs more than the graph's own)."""

    def __init__(self, shape: DecoderShape, blocks: list[dict[str, torch.Tensor]], *, kv_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.shape = shape
        self.kv_dtype = kv_dtype
        self.blocks = nn.ModuleList()
        for i, b in enumerate(blocks):
            m = nn.Module()
            last = i == len(blocks) - 1
            # the last layer's keys and values are all it leaves in the cache
            proj = ("k", "v") if last else ("q", "k", "v")
            for name in proj:
                m.register_buffer(name, b.pop(name).contiguous())
                if f"{name}_bias" in b:
                    m.register_buffer(f"{name}_bias", b.pop(f"{name}_bias").contiguous())
            for name in ("attn_norm", "k_norm") if last else ("attn_norm", "k_norm", "q_norm", "o", "ffn_norm", "gate", "up", "down"):
                if name in b:
                    m.register_buffer(name, b.pop(name).contiguous())
            b.clear()
            self.blocks.append(m)
        half = shape.head_dim // 2
        inv = 1.0 / (shape.rope_base ** (np.arange(half, dtype=np.float64) * 2.0 / shape.head_dim))
        self.register_buffer("inv_freq", torch.tensor(inv, dtype=torch.float32))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # NEOX-style rotation (llama.cpp's rope type for Qwen2/Qwen3): the two halves of each head
        half = self.shape.head_dim // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def forward(self, rows: torch.Tensor, start: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.shape
        # each layer's cached keys, then values, [p, kv_dim] apiece (``layer_inputs``)
        past_k, past_v = past[: s.n_layer], past[s.n_layer :]
        t, p = rows.shape[0], past_k[0].shape[0]
        n_kv, d = s.n_head_kv, s.head_dim
        group = s.n_head // n_kv
        pos = (torch.arange(t, dtype=torch.int64) + start).to(torch.float32)
        ang = pos[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
        scale = 1.0 / d**0.5
        key_pos = torch.arange(p + t, dtype=torch.int64)
        query_pos = torch.arange(t, dtype=torch.int64) + p
        mask = torch.where(key_pos[None, :] > query_pos[:, None], float("-inf"), 0.0)
        x = rows
        ks, vs = [], []
        for i, b in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            h = _rms(x, b.attn_norm, s.rms_eps)
            k = F.linear(h, b.k, getattr(b, "k_bias", None)).reshape(t, n_kv, d)
            v = F.linear(h, b.v, getattr(b, "v_bias", None))
            if hasattr(b, "k_norm"):
                k = _rms(k, b.k_norm, s.rms_eps)
            k = self._rope(k, cos, sin).reshape(t, s.kv_dim)
            ks.append(k.to(self.kv_dtype))
            vs.append(v.to(self.kv_dtype))
            if last:
                break
            if self.kv_dtype != torch.float32:
                # The layer attends over the keys and values as cached, as llama.cpp's own prompt
                # pass does. Reading the casts back also makes ONNX Runtime run them inside their
                # layer: its order otherwise leaves them for the end of the graph, holding every
                # layer's fp32 keys and values alive until then (~0.2 MB per prompt position).
                k, v = ks[-1].to(torch.float32), vs[-1].to(torch.float32)
            q = F.linear(h, b.q, getattr(b, "q_bias", None)).reshape(t, s.n_head, d)
            if hasattr(b, "q_norm"):
                q = _rms(q, b.q_norm, s.rms_eps)
            q = self._rope(q, cos * scale, sin * scale)
            # query head j reads key/value head j // group: [n_kv, group * t, d] against [n_kv, d, p + t]
            q = q.reshape(t, n_kv, group, d).permute(1, 2, 0, 3).reshape(n_kv, group * t, d)
            # the cached positions' keys and values are widened one layer at a time, for the same reason
            k_all = torch.cat([past_k[i].to(torch.float32).view(p, n_kv, d), k.reshape(t, n_kv, d)], dim=0).permute(1, 2, 0)
            v_all = torch.cat([past_v[i].to(torch.float32).view(p, n_kv, d), v.reshape(t, n_kv, d)], dim=0).permute(1, 0, 2)
            att = (torch.matmul(q, k_all).reshape(n_kv, group, t, p + t) + mask).softmax(-1)
            y = torch.matmul(att.reshape(n_kv, group * t, p + t), v_all)
            x = x + F.linear(y.reshape(n_kv, group, t, d).permute(2, 0, 1, 3).reshape(t, s.n_head * d), b.o)
            h = _rms(x, b.ffn_norm, s.rms_eps)
            x = x + F.linear(F.silu(F.linear(h, b.gate)) * F.linear(h, b.up), b.down)
        return (*ks, *vs)


def read_decoder(path: str | Path) -> tuple[DecoderShape, list[dict[str, torch.Tensor]], dict[str, Any]]:
    """A GGUF decoder's shape, its blocks' tensors (dequantized to float32) and the metadata the
    prompt graph carries over (source hash)."""
    import gguf

    p = Path(path)
    reader = gguf.GGUFReader(str(p))

    def field(key: str, default: Any = ...) -> Any:
        f = reader.get_field(key)
        if f is None:
            if default is ...:
                raise CheckpointError(f"{p}: GGUF key {key!r} is missing")
            return default
        return f.contents()

    arch = str(field(KEY_ARCHITECTURE))
    if arch not in ("qwen2", "qwen3"):
        raise CheckpointError(f"{p}: architecture {arch!r} is not a MiDashengLM decoder (qwen2 / qwen3)")
    K = gguf.Keys
    hidden = int(field(K.LLM.EMBEDDING_LENGTH.format(arch=arch)))
    n_head = int(field(K.Attention.HEAD_COUNT.format(arch=arch)))
    shape = DecoderShape(
        arch=arch, n_layer=int(field(K.LLM.BLOCK_COUNT.format(arch=arch))), hidden=hidden, n_head=n_head,
        n_head_kv=int(field(K.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)),
        head_dim=int(field(K.Attention.KEY_LENGTH.format(arch=arch), hidden // n_head)),
        rms_eps=float(field(K.Attention.LAYERNORM_RMS_EPS.format(arch=arch))),
        rope_base=float(field(K.Rope.FREQ_BASE.format(arch=arch), 10000.0)),
    )
    scaling = field(K.Rope.SCALING_TYPE.format(arch=arch), "none")
    if scaling not in ("none", ""):
        raise CheckpointError(f"{p}: RoPE scaling {scaling!r}; the prompt engine knows plain RoPE only")
    stored = {t.name: t for t in reader.tensors}

    def take(name: str) -> torch.Tensor:
        t = stored[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape([int(x) for x in reversed(t.shape)])

    blocks = []
    for i in range(shape.n_layer):
        missing = [n.format(i=i) for n in BLOCK_TENSORS.values() if n.format(i=i) not in stored]
        if missing:
            raise CheckpointError(f"{p}: tensor(s) {', '.join(missing)} missing")
        b = {key: take(name.format(i=i)) for key, name in BLOCK_TENSORS.items()}
        b.update({key: take(name.format(i=i)) for key, name in OPTIONAL_TENSORS.items() if name.format(i=i) in stored})
        blocks.append(b)
    return shape, blocks, {"source_hash": field(KEY_SOURCE_HASH, "")}


def export_prefill_onnx(gguf_path: str | Path, out_path: str | Path, *, kv_dtype: str = "float32") -> Path:
    """The fp32 prompt graph of a GGUF decoder at ``out_path`` (weights in ``<name>.data``), its
    shape and source in the graph's metadata; ``kv_dtype`` (float32 / float16): the type of the
    keys and values it takes and returns."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    dtype = getattr(torch, kv_dtype)
    shape, blocks, carried = read_decoder(gguf_path)
    graph = PrefillGraph(shape, blocks, kv_dtype=dtype).eval()
    del blocks
    out = Path(out_path)
    t, p = torch.export.Dim("rows", min=1, max=1 << 16), torch.export.Dim("past", min=0, max=1 << 20)
    args = (torch.zeros(3, shape.hidden), torch.tensor(2, dtype=torch.int64),
            *(torch.zeros(2, shape.kv_dim, dtype=dtype) for _ in range(2 * shape.n_layer)))
    with torch.no_grad():
        inputs, outputs = layer_inputs(shape.n_layer), layer_outputs(shape.n_layer)
        export_graph(graph, args, out, ["rows", "start", *inputs], outputs, ({0: t}, None, tuple({0: p} for _ in inputs)),
                     {"rows": {0: "rows"}, **{name: {0: "past"} for name in inputs}, **{name: {0: "rows"} for name in outputs}})
    write_metadata(out, {**carried, **shape.metadata(), "kind": "prefill", "opset": OPSET, "precision": "fp32", "kv_dtype": kv_dtype})
    logger.info("exported the prompt graph of %s to %s", gguf_path, out)
    return out


def fits_in_memory(gguf_path: str | Path, *, factor: float = 8.0) -> bool:
    """Whether exporting the prompt graph of this decoder fits this machine's free memory: the
    fp32 weights are held several times over (the module, the exporter's program and graph, the
    saved copy, the quantizer's); measured at 0.6B, the export's peak is ~7x them."""
    import os

    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    params = sum(int(np.prod(t.shape)) for t in reader.tensors if t.name.startswith("blk."))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True
    return params * 4 * factor < avail
