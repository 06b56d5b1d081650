"""The prompt engine's int8 graph (``prefill.int8.onnx``), made from a GGUF decoder, carrying its
measured drift against the fp32 graph.

Every MatMul of the decoder blocks is quantized dynamically (weights int8 per output channel,
activations uint8 on the fly), as the encoder's ``int8`` variant is; the attention products stay
fp32. Its keys and values are float16 in and out, the KV cache's type. The fp32 graph is only a
step on the way (at 0.6B it is 1.7 GB) and is not kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..runtime import quiet_third_party
from ..runtime.gguf_meta import TokenEmbeddings
from ..runtime.onnx_meta import PREFILL_FILE, model_metadata, write_metadata
from ..runtime.options import resolve_threads
from ..runtime.prefill import PrefillEngine
from . import writing_into

logger = logging.getLogger("mdl_edge")

DRIFT_POSITIONS = 48  # prompt positions the drift is measured on


def measure_drift(reference: Path, variant: Path, rows: np.ndarray) -> dict[str, float]:
    """Relative max error and per-position cosine (mean, min) of the variant's keys and values
    against the reference graph's, on prompt ``rows``."""
    threads = resolve_threads(None)
    ka, va = PrefillEngine(reference, threads=threads).run(rows, 0)
    kb, vb = PrefillEngine(variant, threads=threads).run(rows, 0)
    out: dict[str, float] = {"positions": int(rows.shape[0])}
    for name, a, b in (("key", ka, kb), ("value", va, vb)):
        a, b = a.reshape(-1, a.shape[-1]).astype(np.float32), b.reshape(-1, b.shape[-1]).astype(np.float32)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        out[f"{name}_rel_max_error"] = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
        out[f"{name}_cosine_mean"] = float(cos.mean())
        out[f"{name}_cosine_min"] = float(cos.min())
    return out


def drift_rows(gguf_path: Path, n: int = DRIFT_POSITIONS, seed: int = 4321) -> np.ndarray:
    """Prompt rows to measure drift on: the ``token_embd`` rows of ``n`` seeded token ids."""
    table = TokenEmbeddings(gguf_path)
    return table.rows(np.random.default_rng(seed).integers(0, table.n_vocab, n))


def quantize_prefill(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``prefill.int8.onnx`` (+ ``.data``) for the GGUF decoder into ``out_dir`` and return it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..export.convert.onnx_prefill import export_prefill_onnx

    src_gguf = Path(gguf_path)
    dst = Path(os.path.abspath(out_dir)) / PREFILL_FILE
    for p in (dst, dst.with_name(dst.name + ".data")):
        p.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="mdl-edge-prefill-") as tmp:
        src = export_prefill_onnx(src_gguf, Path(tmp) / "prefill.onnx", kv_dtype="float16")
        with quiet_third_party(), writing_into(dst.parent):
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                             use_external_data_format=True)
        meta = {**model_metadata(onnx.load(str(src), load_external_data=False), src), "precision": "int8"}
        write_metadata(dst, meta)
        meta["drift_vs_fp32"] = measure_drift(src, dst, drift_rows(src_gguf))
    write_metadata(dst, meta)
    logger.info("%s: drift vs fp32 %s", dst.name, meta["drift_vs_fp32"])
    return dst
