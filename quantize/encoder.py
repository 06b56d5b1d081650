"""Quantized variants of the ONNX encoder, each carrying its measured drift against fp32.

Variants (ONNX Runtime quantization, weights int8 per output channel):

- ``int8``: dynamic quantization of every weight MatMul (activations quantized on the fly,
  uint8); no calibration, the usual best speed/accuracy trade-off on CPUs with VNNI.
- ``int8-static``: static QDQ quantization of the weight MatMuls, activation ranges calibrated (MinMax)
  on twelve generated 10 s clips; ORT fuses QDQ pairs into integer kernels. At real size no faster than
  dynamic int8 on an AVX2 CPU and slightly less accurate (per-frame cosine 0.9990 vs 0.9994).

Both keep the patch-embedding MatMuls in fp32 (see :func:`patch_embed_nodes`), and attention's
products of two activations (see :func:`activation_matmul_nodes`).

The drift (per-frame cosine and relative error of the 25 Hz features against the fp32 graph on
generated clips) is measured right after quantization and stored in the variant's metadata.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime import constants as C
from ..runtime import quiet_third_party
from ..runtime.audio import demo_clip
from ..runtime.encoder import AudioEncoder
from ..runtime.errors import ConfigError
from ..runtime.mel import log_mel
from ..runtime.onnx_meta import ENCODER_FILE, model_metadata, write_metadata
from . import writing_into

logger = logging.getLogger("mdl_edge")

VARIANTS = ("int8", "int8-static")
CALIBRATION_CLIPS = 12  # generated clips that calibrate int8-static's activation ranges


def variant_file(variant: str) -> str:
    """File name of an encoder variant inside a model folder (``fp32`` is the plain encoder)."""
    return ENCODER_FILE if variant == "fp32" else f"encoder.{variant}.onnx"


def calibration_clips(n: int = 4, seconds: float = 10.0, seed: int = 1234) -> list[np.ndarray]:
    """Generated clips for calibration and drift: the demo mix at several levels plus noise."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        x = demo_clip(seconds, seed=seed + i) * float(0.3 + 1.5 * rng.random())
        x = x + (rng.standard_normal(x.size) * 0.01 * rng.random()).astype(np.float32)
        clips.append(x.astype(np.float32))
    return clips


def _chunks(clips: list[np.ndarray], acoustic_mels: int) -> Iterator[dict[str, np.ndarray]]:
    from ..runtime.encoder import chunk_batch, chunk_plan

    for x in clips:
        mel = log_mel(x, acoustic_mels=acoustic_mels)
        for spec in chunk_plan(max(x.size, C.MIN_SAMPLES)):
            yield chunk_batch([(mel, spec)], keep=acoustic_mels > 0)


def measure_drift(model_dir: Path, variant: str, clips: list[np.ndarray]) -> dict[str, float]:
    """Per-frame cosine (mean, min) and relative max error of a variant's features vs fp32."""
    ref = AudioEncoder(model_dir, threads=None)
    var = AudioEncoder(model_dir, encoder_file=variant_file(variant))
    mels = [ref.log_mel(x) for x in clips]
    lens = [x.size for x in clips]
    fa, fb = ref.encode_mels(mels, lens), var.encode_mels(mels, lens)
    a, b = np.concatenate(fa), np.concatenate(fb)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ea = np.concatenate([ref.project(f) for f in fa])
    eb = np.concatenate([ref.project(f) for f in fb])
    ecos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    return {
        "frame_cosine_mean": float(cos.mean()),
        "frame_cosine_min": float(cos.min()),
        "feature_rel_max_error": float(np.abs(a - b).max() / np.abs(a).max()),
        "embedding_cosine_mean": float(ecos.mean()),
        "embedding_cosine_min": float(ecos.min()),
        "clips": len(clips),
    }


def patch_embed_nodes(model) -> list[str]:
    """Names of the patch-embedding MatMuls: those reached from the ``mel`` input without
    passing another MatMul (the semantic one, and the acoustic one of a DashengTokenizer-style
    encoder).

    They stay fp32 in every int8 variant: their input, the log-mel, spans ~120 dB, so 8-bit
    activations lose most there (Dasheng-0.6B: per-frame cosine 0.9988 -> 0.9994 when it is
    kept fp32) for 0.1% of the encoder's FLOPs.
    """
    weights = {i.name for i in model.graph.initializer}
    reached, found = {"mel"}, []
    for n in model.graph.node:  # ONNX graphs are topologically sorted
        if not reached.intersection(n.input) or n.op_type in ("Shape", "Size"):  # sizes lead everywhere
            continue
        if n.op_type == "MatMul" and n.input[1] in weights:
            found.append(n.name)
        else:
            reached.update(n.output)
    if not found:
        raise ConfigError("the encoder graph has no MatMul on its mel input: not an encoder exported by mdl-edge")
    return found


def activation_matmul_nodes(model) -> list[str]:
    """Names of the MatMuls between two activations (attention's scores and its weighted values).

    ``int8-static`` leaves them fp32, as dynamic int8 does (it quantizes weight products only):
    static QDQ would round the softmax's probabilities to steps of 1/255. Measured on the trained
    toy model (100 clips of each split): with them quantized, connected speech fell 0.04 of word
    accuracy and 0.07 of phrases below fp32 and the feature cosine min to 0.994; without, both
    splits are within 0.01 of fp32 and the cosine min is 0.999.
    """
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input[:2]) & weights]


def quantize_encoder(model_dir: str | Path, variant: str = "int8", *, clips: list[np.ndarray] | None = None) -> Path:
    """Write ``encoder.<variant>.onnx`` (+ ``.data``) next to ``encoder.onnx`` and return it."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if variant not in VARIANTS:
        raise ConfigError(f"unknown encoder variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    d = Path(os.path.abspath(model_dir))
    src, dst = d / ENCODER_FILE, d / variant_file(variant)
    # Twelve clips, not four: on the trained toy model four left ranges that cost 5 of 100
    # held-out captions against fp32, twelve 1 (same held-out clips); MinMax keeps running
    # ranges, so more clips cost time (0.6B encoder: 10 -> 14 s), not memory.
    clips = clips if clips is not None else calibration_clips(n=CALIBRATION_CLIPS)
    for p in (dst, dst.with_name(dst.name + ".data")):
        p.unlink(missing_ok=True)
    graph = onnx.load(str(src), load_external_data=False)  # structure and metadata, no weights
    keep_fp32 = patch_embed_nodes(graph)
    acoustic_mels = int(model_metadata(graph, src).get("acoustic_mels", 0))
    if variant == "int8":
        with quiet_third_party(), writing_into(d):
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"], use_external_data_format=True,
                             nodes_to_exclude=keep_fp32)
    else:
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = _chunks(clips, acoustic_mels)

            def get_next(self):  # noqa: ANN201 (onnxruntime's interface)
                return next(self.it, None)

        with quiet_third_party(), writing_into(d):
            quantize_static(
                src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=["MatMul"],
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_fp32 + activation_matmul_nodes(graph),
            )
    # Carry the fp32 metadata over, with this variant's precision; then its drift, measured on
    # held-out audio (calibration clips would flatter a calibrated variant).
    meta = {**model_metadata(graph, src), "precision": variant}
    write_metadata(dst, meta)
    meta["drift_vs_fp32"] = measure_drift(d, variant, calibration_clips(n=3, seed=98765))
    write_metadata(dst, meta)
    logger.info("%s: drift vs fp32 %s", dst.name, meta["drift_vs_fp32"])
    return dst
