"""Export the Dasheng encoder (1008-frame chunks) and the projector to ONNX.

The chunk graph takes ``mel [B, 64, T]`` and ``n_keys [B]`` (how many leading patches of the
chunk may be attended to) and returns ``[B, T // 4, D]``. ``T`` is a dynamic axis named
``frames`` (a multiple of 4, at most 1008): a clip's last, partial chunk runs at its own length
as in the reference, instead of costing a whole chunk; a backend that needs static shapes pins
``frames`` to 1008 (ONNX Runtime: a free-dimension override) and pads. BatchNorm is folded into a per-bin scale
and shift, the patch embedding is a MatMul over 4-frame patches (quantizable like every other
layer), and ``freq_pos_embed`` is folded into the time table. The runtime derives ``n_keys``
from the clip length (the ``floor(L/640)`` rule, see :func:`runtime.encoder.chunk_plan`).
The projector graph maps stacked frames ``[N, 5*D]`` to ``[N, H]`` with exact (erf) GELU.

A DashengTokenizer-style encoder (spec §6.4) exports the same way with two differences: ``mel``
carries the chunk's acoustic mel under its 64 semantic rows (``[B, 64 + n, T]``), whose 4-frame
patches go through the acoustic MatMul + LayerNorm inside the graph and are added to the
semantic output; and a third input ``n_keep [B]`` says how many leading semantic rows survive
(the rest are zeroed, as the reference does for masked rows in chunks after the first).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from ...runtime import constants as C
from ...runtime import quiet_third_party
from ...runtime.config import EncoderConfig
from ...runtime.errors import MdlEdgeError
from ...runtime.onnx_meta import ENCODER_FILE, FRAMES_AXIS, PROJECTOR_FILE, write_metadata
from .checkpoint import Checkpoint
from ..reference.encoder import DashengEncoder, DashengTokenizerEncoder
from ..reference.model import load_audio_tower

logger = logging.getLogger("mdl_edge")

OPSET = 18


class ChunkEncoder(nn.Module):
    """One chunk of at most 1008 frames through the encoder, with exporter-friendly folded parameters."""

    def __init__(self, enc: DashengEncoder) -> None:
        super().__init__()
        bn = enc.init_bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("bn_scale", scale[:, None].detach().clone())
        self.register_buffer("bn_shift", (bn.bias - bn.running_mean * scale)[:, None].detach().clone())
        conv = enc.patch_embed.proj
        d = conv.out_channels
        # Conv2d(1, D, kernel=stride=(64, 4)) == MatMul over [64 bins x 4 frames] patches
        self.patch = nn.Linear(C.N_MELS * C.PATCH_FRAMES, d)
        self.patch.weight.data.copy_(conv.weight.detach().reshape(d, -1))
        self.patch.bias.data.copy_(conv.bias.detach())
        pos = (enc.time_pos_embed[0, :, 0, :] + enc.freq_pos_embed[0, :, 0, :]).transpose(0, 1)
        self.register_buffer("pos", pos.detach().clone())  # [252, D]
        self.blocks = enc.blocks
        self.norm = enc.norm

    def forward(self, mel: torch.Tensor, n_keys: torch.Tensor) -> torch.Tensor:
        return self.semantic(mel, n_keys)

    def semantic(self, mel: torch.Tensor, n_keys: torch.Tensor) -> torch.Tensor:
        """The Dasheng ViT over the chunk's 64 semantic rows."""
        p = mel.shape[2] // C.PATCH_FRAMES
        x = mel[:, : C.N_MELS] * self.bn_scale + self.bn_shift  # [B, 64, T]
        x = _patches(x, C.N_MELS)
        x = self.patch(x) + self.pos[:p]  # positions restart at 0 in every chunk
        key_valid = torch.arange(p, device=mel.device)[None, :] < n_keys[:, None]
        # An additive mask (0 / float32 min) instead of SDPA's boolean one: the exporter turns a
        # boolean mask into Where(-inf) plus an IsNaN/Where guard for fully masked rows, which
        # cost 18% of an int8 chunk (ORT profile, 0.6b); no row here is fully masked (see
        # chunk_key_mask), so the softmax is the same.
        bias = torch.where(key_valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        for blk in self.blocks:
            x = _block(blk, x, bias)
        return self.norm(x)


def _patches(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``[B, rows, T]`` -> ``[B, T // 4, rows * 4]``: each 4-frame patch flattened (bin, frame) as
    a Conv2d with kernel = stride = (rows, 4) reads it."""
    b, p = x.shape[0], x.shape[2] // C.PATCH_FRAMES
    return x.reshape(b, rows, p, C.PATCH_FRAMES).permute(0, 2, 1, 3).reshape(b, p, rows * C.PATCH_FRAMES)


class TokenizerChunkEncoder(ChunkEncoder):
    """One chunk of a DashengTokenizer-style encoder: the semantic ViT as :class:`ChunkEncoder`,
    rows past ``n_keep`` zeroed, plus the acoustic patches (MatMul + LayerNorm)."""

    def __init__(self, enc: DashengTokenizerEncoder) -> None:
        super().__init__(enc.model)
        self.acoustic_mels = int(enc.cfg.acoustic_mels or 0)
        d = enc.patch_embed.out_channels
        self.acoustic_patch = nn.Linear(self.acoustic_mels * C.PATCH_FRAMES, d)
        self.acoustic_patch.weight.data.copy_(enc.patch_embed.weight.detach().reshape(d, -1))
        self.acoustic_patch.bias.data.copy_(enc.patch_embed.bias.detach())
        self.acoustic_norm = enc.norm

    def forward(self, mel: torch.Tensor, n_keys: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        semantic = self.semantic(mel, n_keys)
        p = semantic.shape[1]
        keep = (torch.arange(p, device=mel.device)[None, :] < n_keep[:, None]).to(semantic.dtype)
        acoustic = self.acoustic_norm(self.acoustic_patch(_patches(mel[:, C.N_MELS :], self.acoustic_mels)))
        return semantic * keep[:, :, None] + acoustic


def _block(blk: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``reference_encoder.Block`` with attention written out (scaled scores + additive key mask,
    softmax, values): the same arithmetic as SDPA's math path."""
    attn = blk.attn
    h = blk.norm1(x)
    b, n, d = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * (d // attn.num_heads) ** -0.5 + bias
    y = torch.softmax(scores, dim=-1) @ v
    x = x + attn.proj(y.transpose(1, 2).reshape(b, n, d))
    mlp = blk.mlp
    return x + mlp.fc2(_gelu(mlp.fc1(blk.norm2(x))))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written in the order ONNX Runtime's GeluFusion matches (x / sqrt 2, erf,
    + 1, times x, times 0.5; PyTorch's own export halves first, which it does not match), so the
    graph runs one Gelu kernel instead of five elementwise ops: ~6.5 of a 0.6B encoder chunk's
    ~66 ms on a 2-core AMX Xeon."""
    return (x * (torch.erf(x / math.sqrt(2.0)) + 1.0)) * 0.5


class _Projector(nn.Module):
    """The projector's Linear -> GELU -> Linear with :func:`_gelu`."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        if len(net) != 3 or not isinstance(net[1], nn.GELU) or net[1].approximate != "none":
            raise MdlEdgeError(f"the projector is not Linear -> exact GELU -> Linear: {net}")
        self.fc1, self.fc2 = net[0], net[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu(self.fc1(x)))


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str], dynamic: tuple,
            axis_names: dict[str, dict[int, str]] | None = None) -> None:
    """Export ``module`` to ``path`` (opset :data:`OPSET`, weights in one ``.data`` file beside it).
    ``axis_names``: ``{value: {axis: name}}`` for graph inputs and outputs whose dynamic axis
    should carry a plain name (the exporter writes expressions such as ``4*patches``)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp, quiet_third_party():
        raw = Path(tmp) / "model.onnx"
        program = torch.onnx.export(
            module, args, str(raw), input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, external_data=True, verbose=False,
        )
        del program
        model = onnx.load(str(raw), load_external_data=True)
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in (axis_names or {}).get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name
    # One data file beside the graph, named after it (real-size encoders exceed protobuf's 2 GB).
    data = path.name + ".data"
    if (path.parent / data).exists():
        (path.parent / data).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)


def export_audio_onnx(checkpoint_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``encoder.onnx`` (+ ``.data``) and ``projector.onnx`` (+ ``.data``) of a checkpoint
    into ``out_dir``. Both carry metadata (dimensions, chunking, opset, precision, source
    checkpoint hash) that the runtime checks before use."""
    ckpt = Checkpoint(checkpoint_dir)
    encoder, projector = load_audio_tower(ckpt)
    return write_audio_onnx(encoder, projector, ckpt.config.encoder, ckpt.config.decoder.hidden_size, ckpt.source_hash(), out_dir)


def write_audio_onnx(encoder: nn.Module, projector: nn.Module, cfg: EncoderConfig, hidden_size: int, source_hash: str,
                     out_dir: str | Path) -> tuple[Path, Path]:
    """The ONNX encoder and projector of reference modules (from a checkpoint or an mmproj)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MdlEdgeError(f"{out}: cannot create the output folder: {e.strerror or e}") from e
    enc_path, proj_path = out / ENCODER_FILE, out / PROJECTOR_FILE
    acoustic_mels = int(cfg.acoustic_mels or 0)
    with torch.no_grad():
        mel = torch.zeros(2, C.N_MELS + acoustic_mels, C.CHUNK_FRAMES)
        n_keys = torch.tensor([C.CHUNK_PATCHES, 7])
        batch = torch.export.Dim("batch", min=1, max=1024)
        frames = C.PATCH_FRAMES * torch.export.Dim(FRAMES_AXIS, min=1, max=C.CHUNK_PATCHES)
        names = {"mel": {2: FRAMES_AXIS}, "features": {1: "patches"}}
        if isinstance(encoder, DashengTokenizerEncoder):
            chunk: ChunkEncoder = TokenizerChunkEncoder(encoder).eval()
            export_graph(chunk, (mel, n_keys, torch.tensor([C.CHUNK_PATCHES, 5])), enc_path, ["mel", "n_keys", "n_keep"], ["features"],
                    ({0: batch, 2: frames}, {0: batch}, {0: batch}), names)
        else:
            chunk = ChunkEncoder(encoder).eval()
            export_graph(chunk, (mel, n_keys), enc_path, ["mel", "n_keys"], ["features"], ({0: batch, 2: frames}, {0: batch}), names)
        rows = torch.export.Dim("rows", min=1, max=1 << 20)
        stacked = torch.zeros(3, cfg.embed_dim * C.SUBSAMPLE)
        export_graph(_Projector(projector.net), (stacked,), proj_path, ["stacked"], ["embeddings"], ({0: rows},))
    common = {"source_hash": source_hash, "opset": OPSET, "embed_dim": cfg.embed_dim, "precision": "fp32"}
    write_metadata(enc_path, {
        **common, "kind": "encoder", "depth": cfg.depth, "num_heads": cfg.num_heads,
        "n_mels": C.N_MELS, "chunk_frames": C.CHUNK_FRAMES, "chunk_patches": C.CHUNK_PATCHES, "hop_length": C.HOP_LENGTH,
        "variant": cfg.variant, "acoustic_mels": acoustic_mels,
    })
    write_metadata(proj_path, {**common, "kind": "projector", "subsample": C.SUBSAMPLE, "hidden_size": hidden_size})
    logger.info("exported %s and %s", enc_path, proj_path)
    return enc_path, proj_path
