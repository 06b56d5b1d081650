"""Ray Data against the single-process CLI on the same files: files/s, Ray's overhead per file,
and whether every file got the same tokens.

    python tests/benchmarks/bench_cluster.py --bundle DIR [--files 64] [--seconds 5] [--workers 1,2]
        [--tokens 32] [--json OUT]

Each run is a fresh process, timed from start to exit as a user sees it (model loading, and for
Ray starting a local instance and its actors, included): `mdl-edge caption FILES --json`,
`mdl-edge caption FILES --out ...` (a resumable job in one process) and `mdl-edge caption FILES
--engine ray --workers N --out ...` with the same options. Workers share
the machine's cores (N workers get cores/N threads each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
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

    cpu_seconds: dict[str, float] = {}

    def sample_cpu(stop: threading.Event) -> None:
        """CPU seconds of Ray's own processes (everything but the actors and the driver) and of
        the actors, from /proc, the last value seen per process."""
        tick = os.sysconf("SC_CLK_TCK")
        seen: dict[int, tuple[str, float]] = {}
        while not stop.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if "ray" not in cmdline or "bench_cluster" in cmdline or "mdl_edge.runtime.cli" in cmdline:
                    continue
                kind = "actors" if "MapWorker" in cmdline else "ray"
                seen[int(d.name)] = (kind, (int(fields[11]) + int(fields[12])) / tick)
            stop.wait(0.5)
        for kind, secs in seen.values():
            cpu_seconds[kind] = cpu_seconds.get(kind, 0.0) + secs

    def timed(cmd: list[str], rows_on: str, row_prefix: str = "") -> tuple[float, list[float], str]:
        """Wall time, and the times at which each file's line appeared (stdout for --json, stderr
        for --engine ray's progress lines)."""
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stream = proc.stdout if rows_on == "stdout" else proc.stderr
        other = proc.stderr if rows_on == "stdout" else proc.stdout
        lines, stamps = [], []
        for line in stream:  # type: ignore[union-attr]
            if line.strip() and line.startswith(row_prefix) and not line.startswith("mdl-edge:"):
                stamps.append(time.perf_counter() - t)
            lines.append(line)
        rest = other.read() if other else ""  # type: ignore[union-attr]
        proc.wait()
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{''.join(lines)[-1000:]}{rest[-1000:]}")
        return wall, stamps, "".join(lines)

    def steady(stamps: list[float]) -> float:
        # files/s once answers flow: from the end of the first quarter to the last answer (Ray
        # hands rows back a batch at a time, so its first rows come late and in bursts)
        k = len(stamps) // 4
        return (len(stamps) - 1 - k) / (stamps[-1] - stamps[k]) if len(stamps) > k + 1 and stamps[-1] > stamps[k] else float("nan")

    runs = []
    wall, stamps, out = timed(cli + common + ["--json"], "stdout")
    local = {r["file"]: r["token_ids"] for r in map(json.loads, out.splitlines())}
    runs.append({"engine": "local (one process)", "workers": 1, "wall": wall, "first": stamps[0], "steady": steady(stamps), "same": len(local)})
    print(f"  local: {wall:.1f} s", flush=True)
    # the same in this process as a job (--out without --engine ray): resumable, rows per batch
    rows_path = work / "here.jsonl"
    rows_path.unlink(missing_ok=True)
    wall, stamps, _ = timed(cli + common[:-1] + ["--out", str(rows_path)], "stderr", str(clips))
    rows = {r["file"]: r["token_ids"] for r in map(json.loads, rows_path.read_text().splitlines())}
    runs.append({"engine": "local job (--out)", "workers": 1, "wall": wall, "first": stamps[0], "steady": steady(stamps),
                 "same": sum(rows.get(p) == local[p] for p in paths)})
    print(f"  local job (--out): {wall:.1f} s", flush=True)
    for n in [int(w) for w in args.workers.split(",")]:
        rows_path = work / f"ray-{n}.jsonl"
        rows_path.unlink(missing_ok=True)
        stop = threading.Event()
        sampler = threading.Thread(target=sample_cpu, args=(stop,))
        cpu_seconds.clear()
        sampler.start()
        try:
            wall, stamps, _ = timed(cli + common[:-1] + ["--engine", "ray", "--workers", str(n), "--cpus-per-worker", str(max(1, cores // n)),
                                                     "--out", str(rows_path)], "stderr", str(clips))
        finally:
            stop.set()
            sampler.join()
        ray_share = {k: v / wall for k, v in cpu_seconds.items()}
        rows = {r["file"]: r["token_ids"] for r in map(json.loads, rows_path.read_text().splitlines())}
        same = sum(rows.get(p) == local[p] for p in paths)
        runs.append({"engine": "ray", "workers": n, "wall": wall, "first": stamps[0], "steady": steady(stamps), "same": same,
                     "cores_ray": ray_share.get("ray", 0.0), "cores_actors": ray_share.get("actors", 0.0)})
        print(f"  ray, {n} worker(s): {wall:.1f} s; Ray's own processes used {ray_share.get('ray', 0.0):.2f} cores on average, "
              f"the actors {ray_share.get('actors', 0.0):.2f}", flush=True)
    base = runs[0]
    print()
    print("| engine | workers | threads each | wall s | first answer s | files/s | x local | overhead per file s | "
          "files/s once flowing | x local | same tokens as local |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        fps = args.files / r["wall"]
        over = (r["wall"] - base["wall"]) / args.files
        threads = cores if r["engine"].startswith("local") else max(1, cores // r["workers"])
        print(f"| {r['engine']} | {r['workers']} | {threads} | {r['wall']:.1f} | {r['first']:.1f} | {fps:.2f} | "
              f"{fps / (args.files / base['wall']):.2f} | {over:+.3f} | {r['steady']:.2f} | {r['steady'] / base['steady']:.2f} | "
              f"{r['same']}/{args.files} |")
    # the fixed cost: a job of one file, each engine
    single = [paths[0]]
    t_local, _, _ = timed([sys.executable, "-m", "mdl_edge.runtime.cli", "caption", *single] + common + ["--json"], "stdout")
    one_out = work / "ray-one.jsonl"
    one_out.unlink(missing_ok=True)
    t_ray, _, _ = timed([sys.executable, "-m", "mdl_edge.runtime.cli", "caption", *single] + common[:-1]
                        + ["--engine", "ray", "--workers", "1", "--cpus-per-worker", str(cores), "--out", str(one_out)], "stderr", str(clips))
    print(f"\nfixed cost, a job of one file: local {t_local:.1f} s, ray {t_ray:.1f} s (+{t_ray - t_local:.1f} s: starting Ray, "
          f"its actor process and Ray Data's plan)")
    one = next((r for r in runs if r["engine"] == "ray" and r["workers"] == 1), None)
    if one:
        ratio = base["wall"] / one["wall"]
        print(f"\ngoal: --engine ray with one worker within 15% of the single-process CLI's files/s: {ratio:.2f}x end to end "
              f"-> {'met' if ratio >= 0.85 else 'NOT met'}; {one['steady'] / base['steady']:.2f}x once answers flow")
        print(f"goal: identical greedy tokens per file: {one['same']}/{args.files} -> {'met' if one['same'] == args.files else 'NOT met'}")
        print(f"profile of the ray run: {t_ray - t_local:.1f} s fixed start of {one['wall'] - base['wall']:.1f} s extra; Ray's own "
              f"processes took {one['cores_ray']:.2f} of the {cores} cores while it ran ({100 * one['cores_ray'] / cores:.0f} %)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_info().describe(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
