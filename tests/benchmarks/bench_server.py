"""Load on `mdl-edge serve`: requests/s, time to first token and tokens/s by concurrency, and a soak.

    python tests/benchmarks/bench_server.py --bundle DIR [--concurrency 1,4,8] [--clips 5,30]
        [--tokens 32] [--requests 16] [--soak 60] [--parallel N] [--json OUT]

Starts the server in its own process (as users run it), then drives it with the official
``openai`` client from threads, each request a streamed chat completion with its own clip (a
different clip each time: the server's embedding cache must not answer for the encoder). Time to
first token is measured at the client: from sending the request to the first content chunk.

The soak runs ``--soak`` seconds at the highest concurrency over ten clips of which one is corrupt:
every good answer must equal that clip's answer when it was sent alone, every bad one must be a
400; the server's RSS is sampled each second, and after the soak no slot may stay busy.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_long import SR, synth_blocks  # noqa: E402


def wav(seconds: float, seed: int) -> bytes:
    import soundfile as sf

    x = np.concatenate(list(synth_blocks(seconds, seed=seed, block=seconds)))
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def messages(audio: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Caption the audio."},
                                         {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}]}]


def one(client, audio: bytes, tokens: int) -> dict:
    """One streamed chat completion: its text, time to first content, total time, new tokens."""
    t0 = time.perf_counter()
    first = None
    text = []
    usage = None
    for chunk in client.chat.completions.create(model="m", messages=messages(audio), max_tokens=tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    total = time.perf_counter() - t0
    return {"text": "".join(text), "ttft": first if first is not None else total, "total": total,
            "tokens": usage.completion_tokens if usage else 0}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(client, clips: list[bytes], concurrency: int, tokens: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda c: one(client, c, tokens), clips))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in runs]
    n_tok = sum(r["tokens"] for r in runs)
    return {"requests": len(runs), "wall": wall, "rps": len(runs) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": pct(ttft, 0.95), "tokens_per_s": n_tok / wall, "tokens_per_request": n_tok / len(runs)}


def soak(client, url: str, pid: int, seconds: float, concurrency: int, tokens: int, seed: int) -> dict:
    import openai

    good = [wav(5.0, seed + k) for k in range(9)]
    bad = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 8  # a WAV header over garbage
    want = [one(client, g, tokens)["text"] for g in good]  # each alone first
    pool = [(g, w) for g, w in zip(good, want)] + [(bad, None)]
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    counts = {"good": 0, "good_wrong": 0, "bad": 0, "bad_not_400": 0, "other_errors": 0}
    rss: list[tuple[float, float]] = []
    examples: list[dict] = []
    t_start = time.monotonic()

    def client_loop(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            audio, expect = pool[i % len(pool)]
            i += 1
            try:
                text = one(client, audio, tokens)["text"]
                with lock:
                    if expect is None:
                        counts["bad_not_400"] += 1
                    else:
                        counts["good"] += 1
                        counts["good_wrong"] += text != expect
                        if text != expect and len(examples) < 3:
                            examples.append({"alone": expect, "in_soak": text})
            except openai.BadRequestError:
                with lock:
                    counts["bad" if expect is None else "other_errors"] += 1
            except Exception:
                with lock:
                    counts["other_errors"] += 1

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - t_start, rss_mb(pid)))
        time.sleep(1.0)
    for t in threads:
        t.join()
    import httpx

    deadline = time.monotonic() + 10
    while True:
        health = httpx.get(url + "/health").json()
        if (health["slots_busy"] == 0 and health["in_progress"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    warm = [r for t, r in rss if t >= min(10.0, seconds / 3)]
    return {**counts, "seconds": seconds, "rss_after_warmup_mb": warm[0] if warm else float("nan"),
            "rss_max_mb": max(warm) if warm else float("nan"), "rss_end_mb": rss[-1][1] if rss else float("nan"),
            "rss_growth": (max(warm) / warm[0] - 1) if warm else float("nan"), "idle_after": health, "differing": examples}


def start(bundle: str, port: int, parallel: int | None) -> tuple[subprocess.Popen, dict]:
    """`mdl-edge serve` in its own process, once it answers /health."""
    import httpx

    cmd = [sys.executable, "-m", "mdl_edge.runtime.cli", "serve", "--model", bundle, "--port", str(port)]
    if parallel:
        cmd += ["--parallel", str(parallel)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            return server, httpx.get(f"http://127.0.0.1:{port}/health").json()
        except httpx.HTTPError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
            time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--clips", default="5,30")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16, help="requests per cell (at least 2x the concurrency)")
    ap.add_argument("--soak", type=float, default=60.0, help="seconds of soak at the highest concurrency (0: none)")
    ap.add_argument("--soak-bundle", help="run the soak on this bundle instead (a trained model: random weights have near-ties "
                    "that round-off in batched steps can flip)")
    ap.add_argument("--parallel", type=int, help="the server's --parallel (default: its own default)")
    ap.add_argument("--port", type=int, default=18123)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import openai

    from mdl_edge.runtime.cpu import cpu_info

    conc = [int(c) for c in args.concurrency.split(",")]
    lengths = [float(s) for s in args.clips.split(",")]
    url = f"http://127.0.0.1:{args.port}"
    server, health = start(args.bundle, args.port, args.parallel)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        print(f"CPU: {cpu_info().describe()}")
        print(f"server: {args.bundle}, {health['slots']} slots; {args.tokens} new tokens per request, streamed chat completions")
        one(client, wav(2.0, 999), 4)  # warm-up
        rows = []
        seed = 0
        for seconds in lengths:
            for c in conc:
                n = max(args.requests, 2 * c)
                clips = [wav(seconds, seed + k) for k in range(n)]
                seed += n
                r = load(client, clips, c, args.tokens)
                rows.append({"clip_s": seconds, "concurrency": c, **r})
                print(f"  {seconds:g} s clips, concurrency {c}: {r['rps']:.2f} req/s, TTFT p50 {r['ttft_p50']:.2f} s "
                      f"p95 {r['ttft_p95']:.2f} s, {r['tokens_per_s']:.1f} tok/s", flush=True)
        print()
        print("| clip | concurrency | requests | req/s | x conc. 1 | TTFT p50 s | TTFT p95 s | p95 / conc. 1 | tokens/s | tokens/request |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            base = next(b for b in rows if b["clip_s"] == r["clip_s"] and b["concurrency"] == conc[0])
            print(f"| {r['clip_s']:g} s | {r['concurrency']} | {r['requests']} | {r['rps']:.2f} | {r['rps'] / base['rps']:.2f} | "
                  f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['ttft_p95'] / base['ttft_p95']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['tokens_per_request']:.1f} |")
        cell = {(r["clip_s"], r["concurrency"]): r for r in rows}
        if (5.0, 1) in cell and (5.0, 4) in cell:
            a, b = cell[(5.0, 1)], cell[(5.0, 4)]
            print(f"\ngoal: throughput at concurrency 4 >= 1.6x concurrency 1 (5 s clips): {b['rps'] / a['rps']:.2f}x "
                  f"-> {'met' if b['rps'] / a['rps'] >= 1.6 else 'NOT met'}")
            print(f"goal: p95 TTFT at concurrency 4 <= 3x concurrency 1: {b['ttft_p95'] / a['ttft_p95']:.2f}x "
                  f"-> {'met' if b['ttft_p95'] / a['ttft_p95'] <= 3 else 'NOT met'}")
        result = {"cpu": cpu_info().describe(), "rows": rows}
        if args.soak > 0:
            if args.soak_bundle:
                server.terminate()
                server.wait(30)
                server, health = start(args.soak_bundle, args.port, args.parallel)
            s = soak(client, url, server.pid, args.soak, max(conc), args.tokens, seed=10_000)
            result["soak"] = s
            print(f"\nsoak on {args.soak_bundle or args.bundle} ({health['slots']} slots): {s['seconds']:g} s at concurrency "
                  f"{max(conc)}, one corrupt file in ten: {s['good']} good answers "
                  f"({s['good_wrong']} differ from the clip's answer alone), {s['bad']} corrupt -> 400 ({s['bad_not_400']} not), "
                  f"{s['other_errors']} other errors")
            print(f"soak: RSS after warm-up {s['rss_after_warmup_mb']:.0f} MB, max {s['rss_max_mb']:.0f} MB "
                  f"({100 * s['rss_growth']:+.1f} %), end {s['rss_end_mb']:.0f} MB; after: {s['idle_after']}")
            ok = (s["good_wrong"] == 0 and s["bad_not_400"] == 0 and s["other_errors"] == 0 and s["rss_growth"] <= 0.05
                  and s["idle_after"]["slots_busy"] == 0 and s["idle_after"]["in_progress"] == 0)
            for ex in s["differing"]:
                print(f"  differs: alone {ex['alone']!r}\n           soak  {ex['in_soak']!r}")
            print(f"goal: soak -> {'met' if ok else 'NOT met'}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
