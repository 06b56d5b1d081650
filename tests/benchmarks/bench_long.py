"""Long recordings: wall time, real-time factor and peak RSS per duration.

    python tests/benchmarks/bench_long.py --bundle DIR [--minutes 10,60,120] [--parallel 4] [--tokens 32]

Generates FLAC files (block by block: speech-like bursts with pauses, music, noise) of each
duration and transcribes each in its own process (``AudioLM.transcribe_segments``, int8 +
Q4_K_M, stop tokens ignored so every segment does the same work), plus one 30 s clip for the
real-time-factor baseline. Prints the CPU, and per file: segments, wall time, real-time factor
and its ratio to the 30 s clip's, peak RSS and its ratio to the shortest file's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SR = 16000


def synth_blocks(seconds: float, seed: int = 0, block: float = 10.0):
    """Speech-like bursts (harmonic buzz under a syllable envelope) with pauses, stretches of
    music (chords) and of noise, generated 10 s at a time."""
    rng = np.random.default_rng(seed)
    t0 = 0
    total = int(seconds * SR)
    while t0 < total:
        n = min(int(block * SR), total - t0)
        t = (np.arange(n) + t0) / SR
        kind = rng.choice(["speech", "speech", "speech", "music", "noise"])
        if kind == "speech":
            f0 = rng.uniform(100, 220)
            buzz = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
            syll = (np.sin(2 * np.pi * rng.uniform(3, 5) * t) > 0).astype(np.float32)
            x = buzz * syll * 0.1
            for _ in range(int(rng.integers(1, 4))):  # pauses of 0.4-1.5 s
                a = int(rng.uniform(0, n - 1))
                x[a : a + int(rng.uniform(0.4, 1.5) * SR)] = 0
        elif kind == "music":
            x = sum(np.sin(2 * np.pi * f * t) for f in rng.choice([261.6, 329.6, 392.0, 440.0, 523.3], 3)) * 0.05
        else:
            x = rng.standard_normal(n) * 0.03
        yield (x + rng.standard_normal(n) * 0.002).astype(np.float32)
        t0 += n


def write_flac(path: Path, seconds: float) -> None:
    import soundfile as sf

    if path.exists() and abs(sf.info(str(path)).duration - seconds) < 1:
        return
    with sf.SoundFile(str(path), "w", SR, 1, format="FLAC") as f:
        for x in synth_blocks(seconds):
            f.write(x)


def _worker(bundle: str, path: str, parallel: int, tokens: int, max_pause: float | None = None) -> dict:
    import soundfile as sf

    from mdl_edge.export.bench.end_to_end import _peak_rss
    from mdl_edge.runtime.options import GenerationOptions
    from mdl_edge.runtime.pipeline import AudioLM
    from mdl_edge.runtime.segments import SegmentOptions

    with AudioLM(bundle, encoder="int8", decoder="Q4_K_M") as lm:
        t = time.perf_counter()
        segs = list(lm.transcribe_segments(path, GenerationOptions(max_new_tokens=tokens, ignore_eos=True), parallel=parallel,
                                           segmenting=SegmentOptions(max_pause=max_pause)))
        wall = time.perf_counter() - t
    return {"file": path, "seconds": sf.info(path).duration, "answered": sum(g.end - g.start for g in segs), "segments": len(segs),
            "wall": wall, "peak_rss_gb": _peak_rss() / 1e9}


def main() -> None:
    from mdl_edge.runtime.segments import SegmentOptions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--minutes", default="10,60,120")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/mdl-edge-long")
    ap.add_argument("--max-pause", type=float, default=SegmentOptions().max_pause, help="pauses longer than this are left out of the segments; 0 keeps every pause")
    args = ap.parse_args()
    from mdl_edge.runtime.cpu import cpu_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lengths = [0.5] + [float(m) for m in args.minutes.split(",")]
    rows = []
    for minutes in lengths:
        path = work / f"long-{minutes:g}min.flac"
        write_flac(path, minutes * 60)
        code = f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_long import _worker; " \
               f"print(json.dumps(_worker({args.bundle!r}, {str(path)!r}, {args.parallel}, {args.tokens}, {args.max_pause or None!r})))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"CPU: {cpu_info().describe()}")
    print(f"transcribe_segments, int8 + Q4_K_M, {args.tokens} new tokens per segment (stop ignored), parallel {args.parallel}, "
          f"{f'pauses over {args.max_pause:g} s left out' if args.max_pause else 'every pause kept'}\n")
    print("| file | segments | audio answered (min) | wall (s) | real-time factor | vs 30 s clip | peak RSS (GB) | vs shortest long file |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base_rtf = rows[0]["wall"] / rows[0]["seconds"]
    base_rss = rows[1]["peak_rss_gb"] if len(rows) > 1 else rows[0]["peak_rss_gb"]
    for r in rows:
        rtf = r["wall"] / r["seconds"]
        print(f"| {r['seconds'] / 60:.1f} min | {r['segments']} | {r['answered'] / 60:.1f} | {r['wall']:.1f} | {rtf:.3f} | {rtf / base_rtf:.2f}x | {r['peak_rss_gb']:.2f} | "
              f"{r['peak_rss_gb'] / base_rss:.2f}x |")


if __name__ == "__main__":
    main()
