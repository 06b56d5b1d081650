"""Ray Data against the single-process CLI on the same files: files/s, Ray's overhead per file,
and whether every file got the same tokens.

    python tests/benchmarks/bench_cluster.py --bundle DIR [--files 64] [--seconds 5] [--workers 1,2]
        [--tokens 32] [--json OUT]

Each run is a fresh process, timed from start to exit as a user sees it (model loading, and for
Ray starting a local instance and its actors, included): `mdl-edge caption FILES --json` and
`mdl-edge caption FILES --engine ray --workers N --out ...` with the same options. Workers share
the machine's cores (N workers get cores/N threads each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_long import SR, synth_blocks  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=4, help="sequences decoded together, in the CLI and in each actor")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mdl-edge-bench-cluster"))
    ap.add_argument("--json")
    args = ap.parse_args()

    import numpy as np
    import soundfile as sf

    from mdl_edge.runtime.cpu import cpu_info
    from mdl_edge.runtime.options import available_cores

    work = Path(args.work)
    clips = work / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(args.files):
        p = clips / f"clip{k:03d}.wav"
        if not p.exists():
            sf.write(p, np.concatenate(list(synth_blocks(args.seconds, seed=k, block=args.seconds))), SR, subtype="PCM_16")
        paths.append(str(p))
    common = ["--model", args.bundle, "--max-new-tokens", str(args.tokens), "--parallel", str(args.parallel), "--no-progress"]
    cli = [sys.executable, "-m", "mdl_edge.runtime.cli", "caption", *paths]
    cores = available_cores()
    print(f"CPU: {cpu_info().describe()}; {cores} cores")
    print(f"{args.files} clips of {args.seconds:g} s, {args.tokens} new tokens each at most, {args.parallel} sequences per decoder")

    def timed(cmd: list[str]) -> tuple[float, str]:
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-2000:]}")
        return wall, proc.stdout

    runs = []
    wall, out = timed(cli + common + ["--json"])
    local = {r["file"]: r["token_ids"] for r in map(json.loads, out.splitlines())}
    runs.append({"engine": "local (one process)", "workers": 1, "wall": wall, "same": len(local)})
    print(f"  local: {wall:.1f} s", flush=True)
    for n in [int(w) for w in args.workers.split(",")]:
        rows_path = work / f"ray-{n}.jsonl"
        rows_path.unlink(missing_ok=True)
        wall, _ = timed(cli + common + ["--engine", "ray", "--workers", str(n), "--cpus-per-worker", str(max(1, cores // n)),
                                        "--out", str(rows_path)])
        rows = {r["file"]: r["token_ids"] for r in map(json.loads, rows_path.read_text().splitlines())}
        same = sum(rows.get(p) == local[p] for p in paths)
        runs.append({"engine": "ray", "workers": n, "wall": wall, "same": same})
        print(f"  ray, {n} worker(s): {wall:.1f} s", flush=True)
    base = runs[0]
    print()
    print("| engine | workers | threads each | wall s | files/s | x local | overhead per file s | same tokens as local |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        fps = args.files / r["wall"]
        over = (r["wall"] - base["wall"]) / args.files
        threads = cores if r["engine"].startswith("local") else max(1, cores // r["workers"])
        print(f"| {r['engine']} | {r['workers']} | {threads} | {r['wall']:.1f} | {fps:.2f} | {fps / (args.files / base['wall']):.2f} | "
              f"{over:+.3f} | {r['same']}/{args.files} |")
    one = next((r for r in runs if r["engine"] == "ray" and r["workers"] == 1), None)
    if one:
        ratio = base["wall"] / one["wall"]
        print(f"\ngoal: --engine ray with one worker within 15% of the single-process CLI's files/s: {ratio:.2f}x "
              f"-> {'met' if ratio >= 0.85 else 'NOT met'}")
        print(f"goal: identical greedy tokens per file: {one['same']}/{args.files} -> {'met' if one['same'] == args.files else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_info().describe(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
