"""Write a model bundle (see ``runtime/bundle.py``) from an official-layout checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ...quantize.decoder import GGUF_TYPES, quantize_decoder
from ...quantize.encoder import VARIANTS as ENCODER_VARIANTS
from ...quantize.encoder import quantize_encoder, variant_file
from ...runtime import constants as C
from ...runtime.errors import ConfigError
from ...runtime.manifest import MANIFEST, DecoderPart, EncoderPart, Manifest, PrefillPart, ProjectorPart, TokenIds, Variant
from ...runtime.onnx_meta import PROJECTOR_FILE, read_file_metadata
from ...runtime.prompt import PromptFormat
from .checkpoint import Checkpoint
from .gguf_decoder import OUT_TYPES, export_decoder_gguf
from .onnx_encoder import export_audio_onnx

logger = logging.getLogger("mdl_edge")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, *, encoders: list[str], decoders: list[str], progress=print) -> Path:
    """Export encoder variants (``fp32``, ``int8``, ...) and decoder variants (``f32``/``f16``/
    ``bf16`` or a GGUF quant type such as ``Q4_K_M``) into one bundle. ``checkpoint_dir`` is an
    official checkpoint folder, or a folder holding the official GGUF pair (text GGUF + mmproj;
    also in the Hugging Face cache layout), see ``gguf_pair.py``."""
    from .gguf_pair import export_bundle_from_pair, is_gguf_pair_dir

    if not encoders or not decoders:
        raise ConfigError("a bundle needs at least one encoder and one decoder variant")
    if is_gguf_pair_dir(checkpoint_dir):
        return export_bundle_from_pair(checkpoint_dir, out_dir, encoders=encoders, decoders=decoders, progress=progress)
    bad_enc = [e for e in encoders if e != "fp32" and e not in ENCODER_VARIANTS]
    bad_dec = [d for d in decoders if d not in OUT_TYPES and d not in GGUF_TYPES]
    if bad_enc or bad_dec:
        raise ConfigError(
            f"unknown variant(s): {', '.join(bad_enc + bad_dec)}; encoders: fp32, {', '.join(ENCODER_VARIANTS)}; "
            f"decoders: {', '.join(OUT_TYPES)}, {', '.join(GGUF_TYPES)}"
        )
    ckpt = Checkpoint(checkpoint_dir)
    fmt = PromptFormat.from_dir(ckpt.dir)
    out = Path(out_dir)
    t = time.perf_counter()
    export_audio_onnx(ckpt.dir, out)
    progress(f"  encoder + projector -> ONNX ({time.perf_counter() - t:.1f} s)")
    # the unquantized GGUF every quant type is made from
    base_type = next((d for d in decoders if d in OUT_TYPES), "f16")
    t = time.perf_counter()
    base = export_decoder_gguf(ckpt.dir, out / f"decoder.{base_type}.gguf", out_type=base_type)
    progress(f"  decoder -> GGUF {base_type} ({time.perf_counter() - t:.1f} s)")
    dec_files = {}
    for d in decoders:
        if d in OUT_TYPES:
            dec_files[d] = base if d == base_type else export_decoder_gguf(ckpt.dir, out / f"decoder.{d}.gguf", out_type=d)
        else:
            t = time.perf_counter()
            dec_files[d] = quantize_decoder(base, out / f"decoder.{d}.gguf", d)
            progress(f"  decoder {d} ({time.perf_counter() - t:.1f} s)")
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copy(ckpt.dir / name, out / name)
    cfg = ckpt.config
    finish_bundle(
        out, encoders=encoders, decoder_files=dec_files, default_decoder=decoders[-1], fmt=fmt, source_hash=ckpt.source_hash(),
        source_name=ckpt.dir.name, embed_dim=cfg.encoder.embed_dim, depth=cfg.encoder.depth, hidden_size=cfg.decoder.hidden_size,
        arch=cfg.decoder.arch, vocab_size=cfg.decoder.vocab_size, prefill_source=(base_type, base), progress=progress,
    )
    if base_type not in decoders:
        base.unlink()
    return out


def finish_bundle(out: Path, *, encoders: list[str], decoder_files: dict[str, Path], default_decoder: str, fmt: PromptFormat,
                  source_hash: str, source_name: str, embed_dim: int, depth: int, hidden_size: int, arch: str, vocab_size: int,
                  prefill_source: tuple[str, Path] | None = None, progress=print) -> Path:
    """Quantized encoder variants from ``encoder.onnx``, the prompt engine, then ``manifest.json``:
    the steps every bundle shares once its fp32 ONNX graphs, GGUF decoders and tokenizer files are
    in ``out``. ``prefill_source``: the decoder variant (name, file) the prompt engine is made
    from, the most precise one; it is made when a variant is a quantized type (those are the
    decoders it serves) and this machine has the memory to export it."""
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
    prefill = _prefill(out, prefill_source, decoder_files, progress)
    s = fmt.special
    Manifest(
        source_hash=source_hash,
        source_name=source_name,
        encoder=EncoderPart(default=encoders[-1] if encoders[-1] in enc_variants else next(iter(enc_variants)),
                            variants={k: Variant(f, drift_vs_fp32=_drift(out / f)) for k, f in enc_variants.items()},
                            embed_dim=embed_dim, depth=depth, chunk_frames=C.CHUNK_FRAMES),
        projector=ProjectorPart(PROJECTOR_FILE, embed_dim * C.SUBSAMPLE, hidden_size),
        decoder=DecoderPart(default=default_decoder, variants={d: Variant(p.name, bytes=p.stat().st_size) for d, p in decoder_files.items()},
                            arch=arch, hidden_size=hidden_size, vocab_size=vocab_size),
        tokens=TokenIds(s.audio, s.audio_bos, s.audio_eos, s.im_end, s.end_of_text, tuple(fmt.stop_ids)),
        chat_template=fmt.chat_template,
        prefill=prefill,
    ).write(out / MANIFEST)
    _ordinary_modes(out)
    return out


def _prefill(out: Path, source: tuple[str, Path] | None, decoder_files: dict[str, Path], progress) -> PrefillPart | None:
    from ...quantize.prefill import quantize_prefill
    from .onnx_prefill import fits_in_memory

    if source is None or not any(d in GGUF_TYPES for d in decoder_files):
        return None
    name, path = source
    if not fits_in_memory(path):
        progress(f"  prompt engine skipped: exporting it from {path.name} needs more free memory than this machine has")
        return None
    t = time.perf_counter()
    made = quantize_prefill(path, out)
    progress(f"  prompt engine (int8, from decoder {name}) ({time.perf_counter() - t:.1f} s)")
    return PrefillPart(made.name, name, _drift(made))


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
