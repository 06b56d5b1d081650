"""Write a model bundle (see ``runtime/bundle.py``) from an official-layout checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ..quantize.decoder import GGUF_TYPES, quantize_decoder
from ..quantize.encoder import VARIANTS as ENCODER_VARIANTS
from ..quantize.encoder import quantize_encoder, variant_file
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST
from ..runtime.errors import ConfigError
from ..runtime.onnx_meta import PROJECTOR_FILE
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
    enc_variants = {"fp32": {"file": variant_file("fp32")}}
    for v in encoders:
        if v == "fp32":
            continue
        t = time.perf_counter()
        path = quantize_encoder(out, v)
        enc_variants[v] = {"file": path.name}
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
        dec_variants[d] = {"file": path.name, "bytes": path.stat().st_size}
    if base_type not in decoders:
        base.unlink()
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copy(ckpt.dir / name, out / name)
    cfg = ckpt.config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_hash": ckpt.source_hash(),
        "source_name": ckpt.dir.name,
        "encoder": {"embed_dim": cfg.encoder.embed_dim, "depth": cfg.encoder.depth, "chunk_frames": 1008,
                    "default": encoders[-1] if encoders[-1] in enc_variants else next(iter(enc_variants)), "variants": {
                        k: {**v, "drift_vs_fp32": _drift(out / v["file"])} for k, v in enc_variants.items()}},
        "projector": {"file": PROJECTOR_FILE, "in_dim": cfg.projector_in, "hidden_size": cfg.decoder.hidden_size},
        "decoder": {"arch": cfg.decoder.arch, "hidden_size": cfg.decoder.hidden_size, "vocab_size": cfg.decoder.vocab_size,
                    "default": decoders[-1], "variants": dec_variants},
        "tokens": {"audio": fmt.special.audio, "audio_bos": fmt.special.audio_bos, "audio_eos": fmt.special.audio_eos,
                   "im_end": fmt.special.im_end, "end_of_text": fmt.special.end_of_text, "stop": list(fmt.stop_ids)},
        "chat_template": fmt.chat_template,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _drift(path: Path) -> dict | None:
    import onnx

    from ..runtime.onnx_meta import META_KEY

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props.get(META_KEY, "{}")).get("drift_vs_fp32")
