"""Live transcription: does it hear what offline transcription hears, how soon, and does it keep up.

    python tests/benchmarks/bench_live.py --toy TOY_BUNDLE [--bundle-06b BUNDLE] [--clips 30] [--accuracy-clips 100] [--minutes 30]

TOY_BUNDLE: the trained toy model exported (``mdl-edge demo`` leaves one; int8 + Q4_K_M are used).
BUNDLE: real-size MiDashengLM-0.6B shapes (``mdl-edge synth --preset 0.6b`` then ``mdl-edge export
... --encoder int8 --decoder Q4_K_M``; random weights, so its text means nothing, only its cost).

Measured in one run, on this machine (named with its SIMD features):

1. **Accuracy and latency** (toy model): held-out espeak-ng clips with speech and no sound after it,
   each followed by 1 s of quiet, streamed at real-time pace into one live session. Per clip: one
   final expected (the final whose span holds the clip's words); word accuracy of the finals
   against the same clips transcribed offline (whole clip, ``AudioLM.transcribe``); final latency =
   the stream's clock when the final arrived minus the end of the clip's last word; first-partial
   latency = the clock at the first partial minus the start of its first word. The same accuracy
   over ``--accuracy-clips`` held-out clips (those over background noise also on their own) and
   as many connected phrases, the stream pushed unpaced with partials off (30 clips hold a few
   words either way; 100 at real-time pace would take minutes).
2. **Four concurrent streams** (toy model): four sessions on one shared engine (4 slots), each fed
   by its own thread at real-time pace as a microphone would (``drop=True``): dropped blocks and
   final latency.
3. **Flat memory** (toy model): ``--minutes`` of speech and quiet pushed as fast as back-pressure
   allows (partials on); process RSS after each simulated minute; growth from minute 2 to the end.
4. **Real-time factor, 0.6B shapes** (int8 encoder + Q4_K_M decoder): one stream at real-time pace
   with partials; RTF = the process's CPU seconds / (audio seconds x threads), i.e. the share of
   the machine the stream used (an upper bound: llama.cpp's and ONNX Runtime's threads spin while
   they wait), and dropped blocks when fed as a microphone.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

SR = 16000
QUIET = 1e-4
# A random-weight decoder never stops: every result is this long. The toy utterances (1-3 s, up to
# 3 words) are 3-8 tokens in Qwen's vocabulary; a real transcript of 3 s of fast speech ~12.
MAX_NEW = 16


def _clips(n: int):
    from mdl_edge.export.toy import world

    out = []
    for c in world.eval_clips("held-out", 6 * n):
        if c.words and all(b <= c.words[0][1] for _, _, b in c.sounds):
            out.append(c)
        if len(out) == n:
            break
    return out


def _stream(clips, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(seed)
    parts, offsets, pos = [], [], 0
    for c in clips:
        offsets.append(pos / SR)
        quiet = (rng.standard_normal(SR) * QUIET).astype(np.float32)
        parts += [c.wave, quiet]
        pos += c.wave.size + quiet.size
    return np.concatenate(parts), offsets


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _match(finals, clips, offsets):
    """For each clip, the final whose span holds its words (None when there is none)."""
    out = []
    for c, off in zip(clips, offsets):
        a, b = off + c.words[0][1], off + c.words[-1][2]
        hit = [f for t, f in finals if f.start <= a + 0.1 and f.end >= b - 0.3 and f.start < b]
        out.append(next(((t, f) for t, f in finals if f in hit), None))
    return out


def _offline_accuracy(lm, clips) -> list[float]:
    """Each clip's word accuracy transcribed offline (the whole clip): what live is compared with."""
    from mdl_edge.export.toy.world import word_accuracy

    return [word_accuracy(lm.transcribe(c.wave, sample_rate=SR).text.strip(), c.transcript) for c in clips]


def accuracy_and_latency(lm, clips) -> dict:
    from mdl_edge.export.toy.world import word_accuracy
    from mdl_edge.runtime.engine import Engine
    from mdl_edge.runtime.live import LiveOptions, LiveSession
    from mdl_edge.runtime.live_audio import paced

    wave, offsets = _stream(clips)
    offline = _offline_accuracy(lm, clips)
    record: list = []
    with Engine(lm, parallel=2) as engine:
        t0 = time.perf_counter()
        s = LiveSession(engine, LiveOptions(), on_event=lambda ev: record.append((time.perf_counter() - t0, ev)))
        for block in paced([wave], SR):
            s.push(block)
        s.finish()
    finals = [(t, e) for t, e in record if e.type == "final"]
    partials = [(t, e) for t, e in record if e.type == "partial"]
    matched = _match(finals, clips, offsets)
    lat, first, live_acc = [], [], []
    for (hit, c, off) in zip(matched, clips, offsets):
        if hit is None:
            live_acc.append(0.0)
            continue
        t, f = hit
        live_acc.append(word_accuracy(f.text, c.transcript))
        lat.append(t - (off + c.words[-1][2]))
        ps = [pt for pt, p in partials if p.item == f.item]
        if ps:
            first.append(ps[0] - (off + c.words[0][1]))
    return {"clips": len(clips), "finals": len(finals), "matched": sum(m is not None for m in matched), "audio_s": wave.size / SR,
            "live_acc": float(np.mean(live_acc)), "offline_acc": float(np.mean(offline)),
            "final_p50": float(np.percentile(lat, 50)), "final_p95": float(np.percentile(lat, 95)),
            "first_partial_p50": float(np.percentile(first, 50)) if first else float("nan"),
            "first_partial_p95": float(np.percentile(first, 95)) if first else float("nan"), "partials": len(partials),
            "with_partial": len(first)}


def accuracy_unpaced(lm, clips) -> dict:
    """Live vs offline word accuracy over many clips: the stream pushed as fast as the session
    takes it, partials off (what is cut and decoded is the same as at real-time pace; only when
    it happens differs). Also over the clips with background noise alone."""
    from mdl_edge.export.toy.world import word_accuracy
    from mdl_edge.runtime.live import LiveOptions, LiveSession

    wave, offsets = _stream(clips)
    offline = _offline_accuracy(lm, clips)
    finals: list = []
    with LiveSession(lm, LiveOptions(partial_every=0), on_event=lambda ev: finals.append((0.0, ev)) if ev.type == "final" else None) as s:
        for k in range(0, wave.size, SR // 10):
            s.push(wave[k : k + SR // 10])
    matched = _match(finals, clips, offsets)
    live = [word_accuracy(h[1].text, c.transcript) if h else 0.0 for h, c in zip(matched, clips)]
    noisy = [i for i, c in enumerate(clips) if "over noise" in c.caption]
    return {"clips": len(clips), "matched": sum(m is not None for m in matched), "live_acc": float(np.mean(live)),
            "offline_acc": float(np.mean(offline)), "noisy": len(noisy), "noisy_live": float(np.mean([live[i] for i in noisy])) if noisy else float("nan"),
            "noisy_offline": float(np.mean([offline[i] for i in noisy])) if noisy else float("nan")}


def _connected(n: int):
    from mdl_edge.export.toy import world

    return [c for c in world.eval_clips("connected", n) if c.transcript]


def concurrent(lm, clips, n: int = 4) -> dict:
    from mdl_edge.runtime.engine import Engine
    from mdl_edge.runtime.live import LiveOptions, LiveSession
    from mdl_edge.runtime.live_audio import paced

    streams = [_stream(clips[k::n], seed=k) for k in range(n)]
    records: list[list] = [[] for _ in range(n)]
    sessions: list = []
    with Engine(lm, parallel=n) as engine:
        t0 = time.perf_counter()
        for k in range(n):
            sessions.append(LiveSession(engine, LiveOptions(drop=True), name=f"stream{k}",
                                        on_event=lambda e, r=records[k]: r.append((time.perf_counter() - t0, e))))

        def play(k: int) -> None:
            for block in paced([streams[k][0]], SR):
                sessions[k].push(block)
            sessions[k].finish()

        threads = [threading.Thread(target=play, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lat = []
    for k in range(n):
        ks = clips[k::n]
        for hit, c, off in zip(_match([(t, e) for t, e in records[k] if e.type == "final"], ks, streams[k][1]), ks, streams[k][1]):
            if hit is not None:
                lat.append(hit[0] - (off + c.words[-1][2]))
    return {"streams": n, "audio_s": sum(s[0].size for s in streams) / SR, "dropped": sum(s.stats.dropped_blocks for s in sessions),
            "finals": sum(s.stats.finals for s in sessions), "final_p95": float(np.percentile(lat, 95)) if lat else float("nan")}


def memory(lm, clips, minutes: int, speed: float = 10.0) -> dict:
    from mdl_edge.runtime.live import LiveOptions, LiveSession
    from mdl_edge.runtime.live_audio import paced

    wave, _ = _stream(clips)
    per_minute = 60 * SR
    total = minutes * per_minute
    rss: list[int] = []
    t0 = time.perf_counter()
    with LiveSession(lm, LiveOptions()) as s:
        pos = 0

        def looped():
            k = 0
            while k < total:
                block = wave[(k % wave.size) : (k % wave.size) + SR // 10]
                k += block.size
                yield block

        for block in paced(looped(), SR, speed=speed):
            s.push(block)
            pos += block.size
            if pos // per_minute > len(rss) - 1:
                rss.append(_rss())
    wall = time.perf_counter() - t0
    base = rss[min(2, len(rss) - 1)]
    return {"minutes": minutes, "wall_s": wall, "rss_mb": [round(r / 2**20) for r in rss], "growth": (max(rss[2:] or rss) - base) / base,
            "finals": s.stats.finals, "partials": s.stats.partials}


def rtf_06b(path: str, clips, threads: int) -> dict:
    from mdl_edge.runtime.live import LiveOptions, LiveSession
    from mdl_edge.runtime.live_audio import paced
    from mdl_edge.runtime.options import GenerationOptions
    from mdl_edge.runtime.pipeline import AudioLM

    wave, _ = _stream(clips)
    with AudioLM(path, threads=threads, encoder="int8", decoder="Q4_K_M") as lm:
        lm.transcribe(wave[: 3 * SR], sample_rate=SR, options=GenerationOptions(max_new_tokens=2))  # warm
        c0, t0 = time.process_time(), time.perf_counter()
        s = LiveSession(lm, LiveOptions(drop=True, generation=GenerationOptions(max_new_tokens=MAX_NEW)))
        for block in paced([wave], SR):
            s.push(block)
        s.finish()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    audio = wave.size / SR
    st = s.stats
    return {"audio_s": audio, "wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / (audio * threads), "rtf": st.real_time_factor,
            "decoder_s": st.decoder_seconds, "dropped": st.dropped_blocks,
            "finals": st.finals, "partials": st.partials, "worker_s": st.worker_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", required=True)
    ap.add_argument("--bundle-06b")
    ap.add_argument("--clips", type=int, default=30)
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--accuracy-clips", type=int, default=100, help="held-out clips and connected phrases for the unpaced accuracy rows")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    from mdl_edge.runtime.cpu import cpu_info
    from mdl_edge.runtime.pipeline import AudioLM

    print(f"CPU: {cpu_info().describe()}; {args.threads} threads\n")
    clips = _clips(args.clips)
    with AudioLM(args.toy, threads=args.threads, encoder="int8", decoder="Q4_K_M") as lm:
        a = accuracy_and_latency(lm, clips)
        print("| toy, one stream at real-time pace | measured | goal |\n|---|---:|---|")
        print(f"| utterances / finals / matched | {a['clips']} / {a['finals']} / {a['matched']} | one final each |")
        print(f"| word accuracy live vs offline | {a['live_acc']:.3f} vs {a['offline_acc']:.3f} (diff {a['live_acc'] - a['offline_acc']:+.3f}) | within 0.05 |")
        print(f"| final after end of speech, p50 / p95 | {a['final_p50']:.2f} / {a['final_p95']:.2f} s | p95 <= 1.0 s |")
        print(f"| first partial after speech start, p50 / p95 | {a['first_partial_p50']:.2f} / {a['first_partial_p95']:.2f} s "
              f"({a['with_partial']} utterances with a partial, {a['partials']} partials) | <= 1.0 s |")
        for name, many in ((f"held-out clips, {args.accuracy_clips}", _clips(args.accuracy_clips)), (f"connected phrases, {args.accuracy_clips}", _connected(args.accuracy_clips))):
            u = accuracy_unpaced(lm, many)
            print(f"| word accuracy live vs offline, {name} (pushed unpaced; {u['matched']} matched) | {u['live_acc']:.3f} vs {u['offline_acc']:.3f} "
                  f"(diff {u['live_acc'] - u['offline_acc']:+.3f}) | within 0.05 |")
            if u["noisy"]:
                print(f"| of which {u['noisy']} over background noise | {u['noisy_live']:.3f} vs {u['noisy_offline']:.3f} "
                      f"(diff {u['noisy_live'] - u['noisy_offline']:+.3f}) | within 0.05 |")
        c = concurrent(lm, clips)
        print(f"| 4 concurrent streams ({c['audio_s']:.0f} s of audio): dropped blocks, finals, final p95 | "
              f"{c['dropped']}, {c['finals']}, {c['final_p95']:.2f} s | no dropped block |")
        m = memory(lm, clips, args.minutes)
        print(f"| {m['minutes']} min stream (at 10x real-time pace: {m['wall_s']:.0f} s): RSS growth after minute 2 | {m['growth'] * 100:+.1f} % "
              f"({m['rss_mb'][2] if len(m['rss_mb']) > 2 else m['rss_mb'][0]} -> {max(m['rss_mb'])} MB max; {m['finals']} finals, "
              f"{m['partials']} partials) | <= 5 % |")
    if args.bundle_06b:
        r = rtf_06b(args.bundle_06b, clips[:10], args.threads)
        print(f"\n| 0.6B shapes, int8 + Q4_K_M, one stream with partials, {MAX_NEW} new tokens a result | measured | goal |\n|---|---:|---|")
        print(f"| real-time factor (compute s / audio s: worker {r['worker_s']:.1f} s + decoder {r['decoder_s']:.1f} s "
              f"for {r['audio_s']:.1f} s) | {r['rtf']:.2f} | < 0.5 |")
        print(f"| share of the machine (process CPU s / audio s / {args.threads} threads; spinning threads included) | "
              f"{r['cpu_share']:.2f} ({r['cpu_s']:.1f} CPU s) | |")
        print(f"| dropped blocks (fed as a microphone) / finals / partials | {r['dropped']} / {r['finals']} / {r['partials']} | 0 dropped |")


if __name__ == "__main__":
    main()
