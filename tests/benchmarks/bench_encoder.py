"""Encoder benchmark at real size: PyTorch fp32 reference vs ONNX Runtime fp32 and int8 variants.

    python tests/benchmarks/bench_encoder.py --onnx DIR [--model CKPT] [--repeats 2]

DIR holds ``mdl-edge export CKPT DIR --encoder fp32,int8,int8-static`` output of a real-size
checkpoint (``mdl-edge synth --preset 0.6b``). Measured in one run: this machine's sgemm GFLOP/s
(torch, 1 and 2 threads), one 1008-frame chunk per path at 1 and 2 threads with its achieved
GFLOP/s, and a 30 s clip (3 chunks) one chunk per run vs batched; plus each variant's per-frame
cosine to the PyTorch reference on that clip.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import best_of


def chunk_gflop(d: int, depth: int, n: int = 252, mlp: int = 4) -> float:
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp * d
    return (depth * per_block + 2 * n * 256 * d) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True, help="folder with encoder*.onnx and projector.onnx")
    ap.add_argument("--model", help="the checkpoint it was exported from (for the PyTorch reference)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch

    from mdl_edge.quantize.encoder import variant_file
    from mdl_edge.runtime import constants as C
    from mdl_edge.runtime.audio import demo_clip
    from mdl_edge.runtime.encoder import AudioEncoder
    from mdl_edge.runtime.mel import log_mel

    onnx_dir = Path(args.onnx)
    rows: list[dict] = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        s = best_of(lambda: a @ b, 3, warmup=True)
        rows.append({"what": "sgemm 2048^3 (torch)", "threads": threads, "s": s, "gflops": 2 * 2048**3 / s / 1e9})

    wave = demo_clip(30.0)
    mel = log_mel(wave)
    n_one = C.CHUNK_FRAMES * C.HOP_LENGTH  # 1009 frames: one full chunk of 252 patches, all valid keys
    one_chunk = mel[:, : C.n_frames(n_one)]
    ref_feats = None
    gflop = None
    if args.model:
        from mdl_edge.export.checkpoint import Checkpoint
        from mdl_edge.export.reference_model import load_audio_tower

        ckpt = Checkpoint(args.model)
        enc, _ = load_audio_tower(ckpt)
        cfg = ckpt.config.encoder
        gflop = chunk_gflop(cfg.embed_dim, cfg.depth)
        mel_t = torch.from_numpy(one_chunk)[None]
        n_t = torch.tensor([n_one])
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                s = best_of(lambda: enc(mel_t, n_t), args.repeats, warmup=True)
            rows.append({"what": "PyTorch fp32 reference, 1 chunk", "threads": threads, "s": s})
        with torch.inference_mode():
            ref_feats = enc(torch.from_numpy(mel)[None], torch.tensor([wave.size]))[0].numpy()
        del enc

    variants = [v for v in ("fp32", "int8", "int8-static") if (onnx_dir / variant_file(v)).is_file()]
    for v in variants:
        for threads in (1, 2):
            e = AudioEncoder(onnx_dir, encoder_file=variant_file(v), threads=threads, max_batch=1)
            gflop = gflop or chunk_gflop(e.embed_dim, int(e.meta["depth"]))
            s = best_of(lambda: e.encode_mels([one_chunk], [n_one]), args.repeats, warmup=True)
            rows.append({"what": f"ORT {v}, 1 chunk", "threads": threads, "s": s})
        for batch in (1, 3):
            e = AudioEncoder(onnx_dir, encoder_file=variant_file(v), threads=2, max_batch=batch)
            s = best_of(lambda: e.encode_mels([mel], [wave.size]), 1)
            feats = e.encode_mels([mel], [wave.size])[0]
            row = {"what": f"ORT {v}, 30 s clip, batch {batch}", "threads": 2, "s": s}
            if ref_feats is not None:
                cos = (feats * ref_feats).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref_feats, axis=1)
                row["cosine_mean"], row["cosine_min"] = float(cos.mean()), float(cos.min())
            rows.append(row)

    base = {r["threads"]: r["s"] for r in rows if r["what"].startswith("PyTorch")}
    print(f"one chunk = {gflop:.0f} GFLOP\n")
    print("| what | threads | time (s) | GFLOP/s | vs PyTorch fp32 (same threads) | cosine to reference (mean / min) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        gf = r.get("gflops") or (gflop / r["s"] if "1 chunk" in r["what"] else 3 * gflop / r["s"])
        ratio = f"{base[r['threads']] / r['s']:.2f}x" if "1 chunk" in r["what"] and r["threads"] in base else "-"
        cos = f"{r['cosine_mean']:.6f} / {r['cosine_min']:.6f}" if "cosine_mean" in r else "-"
        print(f"| {r['what']} | {r['threads']} | {r['s']:.3f} | {gf:.0f} | {ratio} | {cos} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
