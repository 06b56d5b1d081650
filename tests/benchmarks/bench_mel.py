"""Log-mel benchmark: C++ (1 and 2 threads) vs the numpy reference vs torch paths, side by side.

    python tests/benchmarks/bench_mel.py [--minutes 10 60] [--repeats 3] [--json out.json]

For each duration: the torch.stft fp32 path (what vLLM-style PyTorch front ends run), the
PyTorch reference front end of this project (float64 math), the numpy reference, and the C++
extension; then the blockwise path from a FLAC file of the longest duration (decode + resample
+ mel in blocks) with its peak traced memory against the size of its output. Times are the best
of --repeats runs; ratios are against the torch.stft path, all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import best_of


def test_signal(minutes: float, seed: int = 0) -> np.ndarray:
    from mdl_edge.runtime.audio import demo_clip

    clip = demo_clip(60.0, seed=seed)
    reps = int(np.ceil(minutes))
    rng = np.random.default_rng(seed)
    return np.concatenate([clip * (0.5 + rng.random()) for _ in range(reps)])[: int(minutes * 60 * 16000)].astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import soundfile as sf
    import torch

    from mdl_edge import _mel
    from mdl_edge.export.reference.mel import LogMel
    from mdl_edge.runtime import constants as C
    from mdl_edge.runtime.audio import expected_samples, iter_audio
    from mdl_edge.runtime.mel import log_mel, log_mel_blocks, log_mel_numpy

    torch.set_num_threads(2)
    window = torch.hann_window(C.WIN_LENGTH)
    fb = torch.from_numpy(_mel.filterbank())
    ref = LogMel()

    def torch_stft_fp32(x: np.ndarray) -> torch.Tensor:
        spec = torch.stft(torch.from_numpy(x), C.N_FFT, C.HOP_LENGTH, C.WIN_LENGTH, window, center=True, pad_mode="reflect", return_complex=True)
        db = 10 * torch.log10(torch.clamp(fb.T @ spec.abs().pow(2), min=C.LOG_FLOOR))
        return torch.maximum(db, db.max() - C.TOP_DB)

    rows = []
    print(f"CPU: {os.cpu_count()} cores available to Python; torch threads 2\n")
    for minutes in args.minutes:
        x = test_signal(minutes)
        frames = C.n_frames(x.size)
        paths = [
            ("torch.stft fp32 (2 threads)", lambda: torch_stft_fp32(x), args.repeats),
            ("PyTorch reference, float64 (2 threads)", lambda: ref(torch.from_numpy(x)[None]), 1),
            ("numpy reference, float64", lambda: log_mel_numpy(x), 1),
            ("C++, 1 thread", lambda: log_mel(x, n_threads=1), args.repeats),
            ("C++, 2 threads", lambda: log_mel(x, n_threads=2), args.repeats),
        ]
        base = None
        for name, fn, reps in paths:
            s = best_of(fn, reps)
            base = base or s
            rows.append({"audio_min": minutes, "path": name, "ms": s * 1000, "frames_per_s": frames / s, "speedup_vs_torch_stft": base / s})
        err = float(np.abs(log_mel(x) - ref(torch.from_numpy(x)[None])[0].numpy()).max())
        print(f"{minutes:g} min: max |C++ - PyTorch reference| = {err:.2e} dB")

    longest = max(args.minutes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.flac"
        sf.write(path, test_signal(longest), 16000, subtype="PCM_16")
        hint = expected_samples(path)
        tracemalloc.start()
        t = time.perf_counter()
        out = log_mel_blocks(iter_audio(path), expected_samples=hint, n_threads=2)
        s = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        frames = out.shape[1]
        rows.append({"audio_min": longest, "path": "file -> blocks -> C++ mel (2 threads)", "ms": s * 1000, "frames_per_s": frames / s,
                     "speedup_vs_torch_stft": None, "peak_traced_mb": peak / 2**20, "output_mb": out.nbytes / 2**20})

    print("\n| audio | path | time (ms) | frames/s | vs torch.stft |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['speedup_vs_torch_stft']:.1f}x" if r["speedup_vs_torch_stft"] else "-"
        print(f"| {r['audio_min']:g} min | {r['path']} | {r['ms']:.0f} | {r['frames_per_s']:,.0f} | {ratio} |")
    last = rows[-1]
    print(f"\nblockwise {longest:g} min from FLAC: peak traced memory {last['peak_traced_mb']:.1f} MB for a "
          f"{last['output_mb']:.1f} MB output ({last['peak_traced_mb'] / last['output_mb']:.2f}x; goal <= 1.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
