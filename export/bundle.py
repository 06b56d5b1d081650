"""Write a model bundle (see ``runtime/bundle.py``) from an official-layout checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..quantize.decoder import GGUF_TYPES, quantize_decoder
from ..quantize.encoder import VARIANTS as ENCODER_VARIANTS
from ..quantize.encoder import quantize_encoder, variant_file
from ..runtime import constants as C
from ..runtime.errors import ConfigError
from ..runtime.manifest import MANIFEST, DecoderPart, EncoderPart, Manifest, ProjectorPart, TokenIds, Variant
from ..runtime.onnx_meta import PROJECTOR_FILE, read_file_metadata
from ..runtime.prompt import PromptFormat
from .checkpoint import Checkpoint
from .gguf_decoder import OUT_TYPES, export_decoder_gguf
from .onnx_encoder import export_audio_onnx

logger = logging.getLogger("mdl_edge")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, *, encoders: list[str], decoders: list[str], progress=print) -> Path:
    """Export encoder variants (``fp32``, ``int8``, ...) and decoder variants (``f32``/``f16``/
    ``bf16`` or a GGUF quant type such as ``Q4_K_M``) of a checkpoint into one bundle."""
    bad_enc = [e for e in encoders if e != "fp32" and e not in ENCODER_VARIANTS]
    bad_dec = [d for d in decoders if d not in OUT_TYPES and d not in GGUF_TYPES]
    if bad_enc or bad_dec:
        raise ConfigError(
            f"unknown variant(s): {', '.join(bad_enc + bad_dec)}; encoders: fp32, {', '.join(ENCODER_VARIANTS)}; "
            f"decoders: {', '.join(OUT_TYPES)}, {', '.join(GGUF_TYPES)}"
        )
    if not encoders or not decoders:
        raise ConfigError("a bundle needs at least one encoder and one decoder variant")
    ckpt = Checkpoint(checkpoint_dir)
    fmt = PromptFormat.from_dir(ckpt.dir)
    out = Path(out_dir)
    t = time.perf_counter()
    export_audio_onnx(ckpt.dir, out)
    progress(f"  encoder + projector -> ONNX ({time.perf_counter() - t:.1f} s)")
    enc_variants = {"fp32": variant_file("fp32")}
    for v in encoders:
        if v == "fp32":
            continue
        t = time.perf_counter()
        path = quantize_encoder(out, v)
        enc_variants[v] = path.name
        progress(f"  encoder {v} ({time.perf_counter() - t:.1f} s)")
    if "fp32" not in encoders:
        enc_variants.pop("fp32")  # kept on disk: the quantized variants were derived from it
    # the unquantized GGUF every quant type is made from
    base_type = next((d for d in decoders if d in OUT_TYPES), "f16")
    t = time.perf_counter()
    base = export_decoder_gguf(ckpt.dir, out / f"decoder.{base_type}.gguf", out_type=base_type)
    progress(f"  decoder -> GGUF {base_type} ({time.perf_counter() - t:.1f} s)")
    dec_variants = {}
    for d in decoders:
        if d in OUT_TYPES:
            path = base if d == base_type else export_decoder_gguf(ckpt.dir, out / f"decoder.{d}.gguf", out_type=d)
        else:
            t = time.perf_counter()
            path = quantize_decoder(base, out / f"decoder.{d}.gguf", d)
            progress(f"  decoder {d} ({time.perf_counter() - t:.1f} s)")
        dec_variants[d] = Variant(path.name, bytes=path.stat().st_size)
    if base_type not in decoders:
        base.unlink()
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copy(ckpt.dir / name, out / name)
    cfg = ckpt.config
    s = fmt.special
    Manifest(
        source_hash=ckpt.source_hash(),
        source_name=ckpt.dir.name,
        encoder=EncoderPart(default=encoders[-1] if encoders[-1] in enc_variants else next(iter(enc_variants)),
                            variants={k: Variant(f, drift_vs_fp32=_drift(out / f)) for k, f in enc_variants.items()},
                            embed_dim=cfg.encoder.embed_dim, depth=cfg.encoder.depth, chunk_frames=C.CHUNK_FRAMES),
        projector=ProjectorPart(PROJECTOR_FILE, cfg.projector_in, cfg.decoder.hidden_size),
        decoder=DecoderPart(default=decoders[-1], variants=dec_variants, arch=cfg.decoder.arch, hidden_size=cfg.decoder.hidden_size,
                            vocab_size=cfg.decoder.vocab_size),
        tokens=TokenIds(s.audio, s.audio_bos, s.audio_eos, s.im_end, s.end_of_text, tuple(fmt.stop_ids)),
        chat_template=fmt.chat_template,
    ).write(out / MANIFEST)
    _ordinary_modes(out)
    return out


def _ordinary_modes(folder: Path) -> None:
    """Give every file the mode a new file gets from the user's umask: some writers (temporary
    files renamed into place) leave 0600, and a bundle copied to a shared folder must be
    readable by the other users there."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(0o666 & ~umask)


def _drift(path: Path) -> dict | None:
    return read_file_metadata(path).get("drift_vs_fp32")
