"""Long silences in a recording: answered, or left out of the segments (``SegmentOptions.max_pause``).

    python tests/benchmarks/bench_pauses.py --toy TOY_BUNDLE [--bundle BUNDLE] [--phrases 40] [--gaps 0.5,25] [--parallel 2] [--repeats 2]

TOY_BUNDLE: the trained toy model exported (``mdl-edge demo`` leaves one; int8 + Q4_K_M are used).
A recording as a meeting or a field recording has them: held-out toy-world phrases (espeak-ng,
voices and speeds training never used) apart by quiet of random length between the two ``--gaps``
(seconds; a faint noise floor, 50 dB under the speech), transcribed in one process with every
pause kept (segments tile the recording, cut at pauses, at most 30 s) and with pauses over 2 s left
out (the default), alternately ``--repeats`` times (best time of each). Prints the CPU and per way:
segments, seconds of audio answered, wall time, real-time factor and its ratio, word accuracy
over the whole recording (the segments' text in order against the phrases' words), and words
written in segments that hold no phrase. ``--bundle`` (e.g. the ``0.6b`` preset's, random weights:
its text means nothing, every answer runs to the token limit) times the same two ways on real
shapes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SR = 16000


def recording(n: int, gaps: tuple[float, float], seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Held-out phrases with speech and nothing else, apart by quiet: (samples, [(start, end, words)])."""
    from mdl_edge.export.toy import world

    rng = np.random.default_rng(seed)
    phrases = []
    for c in world.eval_clips("held-out", 8 * n):
        if c.transcript and c.caption.startswith(("a man says", "a woman says")) and "," not in c.caption:
            phrases.append(c)
        if len(phrases) == n:
            break
    parts, spans, pos = [], [], 0
    for c in phrases:
        gap = int(rng.uniform(*gaps) * SR)
        parts += [np.zeros(gap, np.float32), c.wave]
        spans.append((pos + gap, pos + gap + c.wave.size, c.transcript))
        pos += gap + c.wave.size
    parts.append(np.zeros(int(gaps[0] * SR), np.float32))
    x = np.concatenate(parts)
    level = float(np.sqrt(np.mean(np.concatenate([c.wave for c in phrases]) ** 2)))
    x = (x + rng.standard_normal(x.size).astype(np.float32) * level * 10 ** (-50 / 20)).astype(np.float32)
    return x, spans


def timed(bundle: str, x: np.ndarray, ways: dict, parallel: int, repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """Best wall time and the segments of each way of ``ways`` (name -> SegmentOptions), run
    alternately ``repeats`` times in one loaded model."""
    from mdl_edge.runtime.options import GenerationOptions
    from mdl_edge.runtime.pipeline import AudioLM

    best: dict[str, float] = {}
    results: dict[str, list] = {}
    with AudioLM(bundle, encoder="int8", decoder="Q4_K_M") as lm:
        lm.transcribe(x[: 3 * SR], sample_rate=SR)  # warm-up
        for _ in range(repeats):
            for name, opts in ways.items():
                t = time.perf_counter()
                results[name] = list(lm.transcribe_segments(x, GenerationOptions(max_new_tokens=16), segmenting=opts, sample_rate=SR,
                                                            parallel=parallel))
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return best, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", required=True, help="the toy model's bundle")
    ap.add_argument("--bundle", help="a bundle of real shapes to time the same two ways on")
    ap.add_argument("--phrases", type=int, default=40)
    ap.add_argument("--gaps", default="0.5,25", help="shortest,longest quiet between phrases in seconds")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from mdl_edge.export.toy.world import word_accuracy
    from mdl_edge.runtime.cpu import cpu_info
    from mdl_edge.runtime.segments import SegmentOptions

    lo, hi = (float(g) for g in args.gaps.split(","))
    x, spans = recording(args.phrases, (lo, hi))
    ref = " ".join(words for _, _, words in spans)
    ways = {"every pause kept": SegmentOptions(mode="vad", max_pause=None), "pauses > 2 s left out": SegmentOptions(mode="vad")}
    print(f"CPU: {cpu_info().describe()}")
    print(f"{len(spans)} held-out phrases ({len(ref.split())} words) apart by {lo:g}-{hi:g} s of quiet: {x.size / SR:.0f} s, "
          f"{sum(b - a for a, b, _ in spans) / SR:.0f} s of them speech; int8 + Q4_K_M, {args.parallel} segments decoded together\n")
    best, results = timed(args.toy, x, ways, args.parallel, args.repeats)
    base = best["every pause kept"]
    print("| segments | way | audio answered s | wall s | real-time factor | x every pause kept | word accuracy | words written in silence |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, segs in results.items():
        hyp = " ".join(s.text.strip() for s in segs)
        stray = sum(len(s.text.split()) for s in segs
                    if not any(s.start * SR < b and a < s.end * SR for a, b, _ in spans))
        answered = sum(s.end - s.start for s in segs)
        print(f"| {len(segs)} | {name} | {answered:.0f} | {best[name]:.2f} | {best[name] / (x.size / SR):.4f} | "
              f"{base / best[name]:.2f}x | {word_accuracy(hyp, ref):.3f} | {stray} |")
    if args.bundle:
        big, _ = timed(args.bundle, x, ways, args.parallel, args.repeats)
        print(f"\n{args.bundle} (int8 + Q4_K_M, answers of 16 tokens): "
              + ", ".join(f"{name} {t:.1f} s" for name, t in big.items())
              + f": {big['every pause kept'] / big['pauses > 2 s left out']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
