"""GGUF k-quant variants of the decoder through llama.cpp's own quantizer.

Each output keeps the source file's metadata (``mdl_edge.source_hash`` among it), so a quantized
decoder still names the checkpoint it came from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..runtime.decoder import init_backend
from ..runtime.errors import ConfigError, MdlEdgeError
from ..runtime.gguf_meta import read_gguf_metadata
from ..runtime.options import resolve_threads

logger = logging.getLogger("mdl_edge")

#: variant name -> llama_cpp LLAMA_FTYPE_* constant name
GGUF_TYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def quantize_decoder(src: str | Path, dst: str | Path, variant: str, *, threads: int | None = None) -> Path:
    """Quantize GGUF ``src`` (f32/f16/bf16, or an already quantized file) to ``variant`` (e.g. ``Q4_K_M``) at ``dst``
    (``threads``: default all available cores)."""
    import ctypes

    if variant not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {variant!r}; choose one of {', '.join(GGUF_TYPES)}")
    src, dst = Path(src), Path(dst)
    read_gguf_metadata(src)  # validate before llama.cpp reads it
    L = init_backend()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, GGUF_TYPES[variant])
    params.nthread = resolve_threads(threads)
    params.allow_requantize = True  # a text GGUF taken as it is may already be quantized (Q8_0)
    tmp = dst.with_name(dst.name + ".partial")
    rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise MdlEdgeError(f"llama.cpp failed to quantize {src} to {variant} (code {rc})")
    tmp.replace(dst)
    logger.info("quantized %s -> %s (%s)", src.name, dst.name, variant)
    return dst
