"""Encoder benchmark at real size: PyTorch fp32 reference vs ONNX Runtime fp32 and int8 variants,
against this machine's own measured peaks.

    python tests/benchmarks/bench_encoder.py --onnx DIR [--model CKPT] [--repeats 2] [--threads 2]

DIR holds ``mdl-edge export CKPT DIR --encoder fp32,int8,int8-static`` output of a real-size
checkpoint (``mdl-edge synth --preset 0.6b``). Measured in one run:

- this machine's fp32 and int8 GEMM rates and read bandwidth (``export/bench/machine.py``); the table
  header names the CPU and its SIMD features;
- one full 1008-frame chunk per path, its achieved rate and the fraction of the peak of its
  precision;
- 1, 3, 5, 10 and 12 s clips per ONNX variant, each partial chunk at its own length and (as
  as the legacy runtime did) padded to 1008 frames, with the ratios of the goals (3 s vs 10 s, 12 s vs 10 s);
- int8 per-frame cosine to fp32 on a 30 s clip, with and without ONNX Runtime's exact int8
  kernels (``session.x64quantprecision``), and which one this CPU gets by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import best_of

GOALS = {"short_vs_10s": 0.35, "long_vs_10s": 1.3, "int8_fraction": 0.75, "cosine": 0.999}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True, help="folder with encoder*.onnx and projector.onnx")
    ap.add_argument("--model", help="the checkpoint it was exported from (for the PyTorch reference)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from mdl_edge.export.bench.machine import encoder_flops, measure
    from mdl_edge.quantize.encoder import variant_file
    from mdl_edge.runtime import constants as C
    from mdl_edge.runtime.audio import demo_clip
    from mdl_edge.runtime.encoder import AudioEncoder, chunk_plan

    onnx_dir = Path(args.onnx)
    peaks = measure(args.threads)
    variants = [v for v in ("fp32", "int8", "int8-static") if (onnx_dir / variant_file(v)).is_file()]
    probe = AudioEncoder(onnx_dir, threads=args.threads)
    d, depth = probe.embed_dim, int(probe.meta["depth"])
    log_mel = probe.log_mel  # the mel this encoder reads (with the acoustic rows of a DashengTokenizer-style one)

    def flops(n_samples: int, padded: bool = False) -> float:
        patches = [s.n_real for s in chunk_plan(max(n_samples, C.MIN_SAMPLES))]
        return encoder_flops(d, depth, 4 * d, [C.CHUNK_PATCHES] * len(patches) if padded else patches, acoustic_mels=probe.acoustic_mels)

    def peak_of(variant: str) -> float:
        return peaks.int8_gops if variant.startswith("int8") else peaks.fp32_gflops

    rows: list[dict] = []
    n_one = C.CHUNK_FRAMES * C.HOP_LENGTH  # 1009 frames: one full chunk of 252 patches, all valid keys
    one_mel = log_mel(demo_clip(n_one / C.SAMPLE_RATE))
    if args.model:
        import torch

        from mdl_edge.export.convert.checkpoint import Checkpoint
        from mdl_edge.export.reference.model import load_audio_tower

        torch.set_num_threads(args.threads)
        enc, _ = load_audio_tower(Checkpoint(args.model))
        mel_t, n_t = torch.from_numpy(one_mel)[None], torch.tensor([n_one])
        with torch.inference_mode():
            s = best_of(lambda: enc(mel_t, n_t), args.repeats, warmup=True)
        rows.append({"what": "PyTorch fp32 reference, full chunk", "variant": "fp32", "seconds": 10.08, "s": s, "gops": flops(n_one) / s / 1e9})
        del enc

    clips = {s: demo_clip(s) for s in (1.0, 3.0, 5.0, 10.0, 12.0)}
    mels = {s: log_mel(w) for s, w in clips.items()}
    for v in variants:
        e = AudioEncoder(onnx_dir, encoder_file=variant_file(v), threads=args.threads, max_batch=1)
        s = best_of(lambda: e.encode_mels([one_mel], [n_one]), args.repeats, warmup=True)
        rows.append({"what": f"ORT {v}, full chunk", "variant": v, "seconds": 10.08, "s": s, "gops": flops(n_one) / s / 1e9})
        for padded in (False, True):
            e = AudioEncoder(onnx_dir, encoder_file=variant_file(v), threads=args.threads, max_batch=1, static_frames=padded)
            for sec, w in clips.items():
                s = best_of(lambda: e.encode_mels([mels[sec]], [w.size]), args.repeats, warmup=True)
                rows.append({"what": f"ORT {v}, {'padded to 1008 frames (legacy)' if padded else 'own length'}", "variant": v, "padded": padded,
                             "seconds": sec, "s": s, "gops": flops(w.size, padded) / s / 1e9})

    drift = []
    if "int8" in variants:
        wave = demo_clip(30.0)
        mel = log_mel(wave)
        (ref,) = AudioEncoder(onnx_dir, threads=args.threads).encode_mels([mel], [wave.size])
        default = AudioEncoder(onnx_dir, encoder_file=variant_file("int8"), threads=args.threads).precise_int8
        for precise in (False, True):
            (got,) = AudioEncoder(onnx_dir, encoder_file=variant_file("int8"), threads=args.threads, precise_int8=precise).encode_mels([mel], [wave.size])
            cos = cosines(got, ref)
            drift.append({"precise": precise, "default": precise == default, "mean": float(cos.mean()), "min": float(cos.min()),
                          "worst_frame": int(cos.argmin())})

    print(peaks.header())
    print(f"encoder: {d}-d, {depth} blocks, acoustic mel bins {probe.acoustic_mels}; one full chunk = {flops(n_one) / 1e9:.0f} GFLOP\n")
    print("| what | clip (s) | time (s) | GFLOP/s (GOP/s) | fraction of this machine's peak for its precision |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['seconds']:g} | {r['s']:.3f} | {r['gops']:.0f} | {r['gops'] / peak_of(r['variant']):.0%} |")
    print()
    for v in variants:
        t = {(r["seconds"], r.get("padded")): r["s"] for r in rows if r["what"].startswith(f"ORT {v},") and "full chunk" not in r["what"]}
        for padded in (False, True):
            short, long_ = t[(3.0, padded)] / t[(10.0, padded)], t[(12.0, padded)] / t[(10.0, padded)]
            tag = "padded (legacy)" if padded else "own length"
            print(f"{v}, {tag}: 3 s / 10 s = {short:.2f} (goal <= {GOALS['short_vs_10s']}: {'met' if short <= GOALS['short_vs_10s'] else 'NOT met'}), "
                  f"12 s / 10 s = {long_:.2f} (goal <= {GOALS['long_vs_10s']}: {'met' if long_ <= GOALS['long_vs_10s'] else 'NOT met'}), "
                  f"1 s / 10 s = {t[(1.0, padded)] / t[(10.0, padded)]:.2f}")
    full = {r["variant"]: r for r in rows if r["what"] == "ORT int8, full chunk"}
    if full:
        frac = full["int8"]["gops"] / peaks.int8_gops
        print(f"int8 full chunk: {frac:.0%} of the int8 GEMM rate (goal >= {GOALS['int8_fraction']:.0%}: {'met' if frac >= GOALS['int8_fraction'] else 'NOT met'})")
    for r in drift:
        print(f"int8 vs fp32, 30 s clip, {'exact u8u8 kernels (session.x64quantprecision=1)' if r['precise'] else 'default u8s8 kernels'}"
              f"{' [this CPU default]' if r['default'] else ''}: per-frame cosine mean {r['mean']:.6f}, worst {r['min']:.6f} (frame {r['worst_frame']})"
              f" (goal >= {GOALS['cosine']}: {'met' if r['min'] >= GOALS['cosine'] else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks.__dict__ | {"cpu": peaks.cpu.describe()}, "rows": rows, "drift": drift}, indent=2))


if __name__ == "__main__":
    main()
