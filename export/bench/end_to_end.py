"""End-to-end benchmark: the PyTorch reference vs runtime bundles, each in its own process.

Every configuration runs in a fresh subprocess (so peak RSS is its own), loads its model once,
then captions each clip (decode + mel + encoder + projector + prefill + a fixed number of
greedy tokens, stop tokens ignored so every configuration does the same work). Reported per clip:
time to first token, total, real-time factor (total / audio duration), each stage's time and its
rate as a fraction of this machine's measured peak (``export/bench/machine.py``), decode tokens/s; per
configuration: load time and peak RSS. The table header names the CPU and its SIMD features.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REFERENCE = "reference fp32 (PyTorch)"
DEFAULT_VARIANTS = (("fp32", "f16"), ("int8", "Q4_K_M"))
DEFAULT_CLIPS = "1,2,3,5,10,30,60,300"
# What the runtime did before it ran partial chunks at their own length, fed the prompt in one
# batch and turned flash attention on: kept as a configuration so that each gain is a ratio
# measured in the same run.
LEGACY = {"encoder": {"static_frames": True}, "decoder": {"one_batch": False, "flash_attn": False, "prefill": "llama"}}  # option fields
# The same variants with llama.cpp evaluating the prompt instead of the bundle's prompt engine.
LLAMA_PROMPT = {"decoder": {"prefill": "llama"}}
# Goals of the int8 + Q4_K_M runtime on MiDashengLM-0.6B's shapes: at least 2.5x the reference end
# to end and time to first token at most half the reference's (AVX-512 machines) on 3, 10 and 30 s
# clips; peak RSS at most 1.2 GB on the 30 s clip.
GOALS = {"peak_rss_gb": 1.2, "ttft": 0.5, "total": 2.5}
GOAL_CLIPS = (3.0, 10.0, 30.0)
# Each stage's share of the rate that bounds it: (goal, stage, rate), as ``_fractions`` measures them.
STAGE_GOALS = {"encoder": (0.8, "encoder", "the faster GEMM rate"), "prompt": (0.7, "prompt", "the fp32 GEMM rate"),
               "decode": (0.5, "decoding", "read bandwidth")}
GOAL_CONFIG = "runtime int8 + Q4_K_M"
# What both sides run once before timing (first-call allocations are not the steady state): one
# second of silence (16 kHz) answered with two tokens under this prompt.
WARMUP_SAMPLES, WARMUP_PROMPT = 16000, "Hi"


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    rows = []
    clips, tokens, threads = job["clips"], job["tokens"], job["threads"]
    import numpy as np

    if job["variants"] is None:
        import torch

        from ...runtime.audio import load_audio
        from ...runtime.prompt import user_message
        from ..reference.model import MiDashengLM

        if threads:
            torch.set_num_threads(threads)
        ref = MiDashengLM.from_pretrained(job["model"])
        load = time.perf_counter() - t
        with torch.inference_mode():
            (warm,) = ref.encode_audio([np.zeros(WARMUP_SAMPLES, np.float32)])
            warm_ids = ref.prompt.encode(user_message(WARMUP_PROMPT), [warm.shape[0]])
            ref.generate_from_embeds(ref.embed_prompt(warm_ids, [warm]), max_new_tokens=2, stop_ids=[])
        for c in _runs(clips, job["repeats"]):
            _reset_peak_rss()
            t0 = time.perf_counter()
            wave = load_audio(c)
            with torch.inference_mode():
                (emb,) = ref.encode_audio([wave])
                t_enc = time.perf_counter() - t0
                ids = ref.prompt.encode(user_message("Caption the audio."), [emb.shape[0]])
                embeds = ref.embed_prompt(ids, [emb])
            t_embed = time.perf_counter() - t0
            toks, _, tm = ref.generate_from_embeds(embeds, max_new_tokens=tokens, stop_ids=[])
            total = time.perf_counter() - t0
            # the reference's first token comes out of the prefill
            rows.append({"clip": c, "seconds": wave.size / 16000, "n_samples": int(wave.size), "ttft": t_embed + tm["prefill"], "total": total,
                         "encoder": t_enc, "prefill": tm["prefill"], "positions": len(ids),
                         "decode_tok_s": max(len(toks) - 1, 1) / tm["decode"] if tm["decode"] else 0.0, "new_tokens": len(toks),
                         "peak_rss_gb": _peak_rss() / 1e9})
    else:
        from ...runtime.options import DecoderOptions, EncoderOptions, GenerationOptions
        from ...runtime.pipeline import AudioLM
        from ...runtime.prompt import CAPTION_PROMPT

        enc, dec = job["variants"]
        fields = job["options"]
        lm = AudioLM(job["bundle"], threads=threads, encoder=EncoderOptions(variant=enc, **fields.get("encoder", {})),
                     decoder=DecoderOptions(variant=dec, **fields.get("decoder", {})))
        load = time.perf_counter() - t
        lm.generate(np.zeros(WARMUP_SAMPLES, np.float32), WARMUP_PROMPT, GenerationOptions(max_new_tokens=2, ignore_eos=True), sample_rate=16000)
        options = GenerationOptions(max_new_tokens=tokens, ignore_eos=True)
        for c in _runs(clips, job["repeats"]):
            _reset_peak_rss()
            # Each clip from an empty KV cache and without its cached embeddings, as a single
            # request meets it: after a request with the same prompt the decoder would reuse the
            # opening positions it has cached, and a clip asked about again skips the encoder.
            lm.decoder.reset()
            lm.clear_cache()
            r = lm.generate(c, CAPTION_PROMPT, options)
            rows.append({"clip": c, "seconds": r.audio_seconds, "n_samples": int(round(r.audio_seconds * 16000)),
                         "ttft": r.timings["time_to_first_token"], "total": r.timings["total"],
                         "encoder": r.timings["encoder"] + r.timings["projector"], "prefill": r.timings["prefill"], "positions": r.n_evaluated,
                         "decode_tok_s": r.tokens_per_second, "new_tokens": len(r.token_ids), "peak_rss_gb": _peak_rss() / 1e9})
        prompt_by = "onnx" if lm.decoder.prefill is not None else "llama"
        repacked = lm.decoder.extra_bufts
        lm.close()
    return {"config": job["config"], "variants": job["variants"], "legacy": job.get("options") == LEGACY,
            "llama_prompt": job.get("options") == LLAMA_PROMPT, "load_s": load, "repeats": job["repeats"],
            "clips": _medians(rows, job["repeats"]),
            **({"prompt_by": prompt_by, "repacked": repacked} if job["variants"] else {})}


def _runs(clips: list[str], repeats: int) -> Iterator[str]:
    """Each clip ``repeats`` times in a row."""
    for c in clips:
        yield from [c] * repeats


# A clip's row over its repeats: the median of each time and rate, the largest peak.
_MEDIAN_KEYS = ("ttft", "total", "encoder", "prefill", "decode_tok_s")


def _medians(rows: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """One row per clip from ``repeats`` consecutive rows of each: the median of every time and
    rate (each on its own), the largest peak RSS, and each run's time to first token."""
    import statistics

    out = []
    for i in range(0, len(rows), repeats):
        group = rows[i : i + repeats]
        row = dict(group[0])
        row.update({k: statistics.median(r[k] for r in group) for k in _MEDIAN_KEYS})
        row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in group)
        row["ttft_runs"] = [r["ttft"] for r in group]
        out.append(row)
    return out


def _reset_peak_rss() -> None:
    """Start a new peak at the current resident set (Linux >= 4.0), so each clip's row shows the
    peak while captioning it (the loaded model included); elsewhere a row's peak also covers the
    clips before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM belongs to the process image; getrusage's
    ru_maxrss would carry over the parent's peak through fork (a parent that just quantized a
    model would report its gigabytes for every worker)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(model: str | Path, bundle: str | Path, clips: list[Path], *, tokens: int = 32, threads: int | None = None,
              variants: tuple[tuple[str, str], ...] = DEFAULT_VARIANTS, reference: bool = True, legacy: bool = True,
              repeats: int = 1) -> list[dict[str, Any]]:
    """Run the reference (unless ``reference=False``), each (encoder, decoder) variant pair, the
    int8 + Q4_K_M pair (else the last one with a quantized decoder) with llama.cpp evaluating the
    prompt instead of the bundle's prompt engine, and (``legacy``) the last pair as the runtime ran before
    (:data:`LEGACY`), each in its own process; each clip ``repeats`` times, its row the median."""
    from ...runtime.bundle import Bundle
    from ...runtime.errors import MdlEdgeError
    from ...runtime.gguf_meta import FULL_PRECISION_TYPES
    from ...runtime.options import whole_number

    whole_number("repeats", repeats)

    b = Bundle.open(bundle)
    for enc, dec in variants:  # fail before any long run
        b.variant("encoder", enc)
        b.variant("decoder", dec)
    configs: list[tuple[str, list[str] | None, dict[str, Any]]] = [(REFERENCE, None, {})] if reference else []
    configs += [(f"runtime {e} + {d}", [e, d], {}) for e, d in variants]
    quantized = [(e, d) for e, d in variants if d not in FULL_PRECISION_TYPES]
    if quantized and b.manifest.prefill is not None:
        e, d = ("int8", "Q4_K_M") if ("int8", "Q4_K_M") in quantized else quantized[-1]
        configs.append((f"runtime {e} + {d}, prompt in llama.cpp", [e, d], LLAMA_PROMPT))
    if legacy and variants:
        e, d = variants[-1]
        configs.append((f"runtime {e} + {d}, legacy (padded chunks, 3-call prompt, no flash attention)", [e, d], LEGACY))
    results = []
    for config, pair, options in configs:
        job = {"config": config, "variants": pair, "options": options, "model": str(model), "bundle": str(bundle),
               "clips": [str(c) for c in clips], "tokens": tokens, "threads": threads, "repeats": repeats}
        proc = subprocess.run([sys.executable, "-m", "mdl_edge.export.bench.end_to_end", json.dumps(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise MdlEdgeError(f"benchmark worker for {config!r} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def _fractions(res: dict[str, Any], r: dict[str, Any], bundle: Any, peaks: Any, costs: dict[str, Any]) -> dict[str, float]:
    """Each stage's achieved rate as a fraction of the machine's rate that bounds it, as the goals
    define them: the encoder against the faster of the fp32 and int8 GEMM rates (an fp32 encoder
    against the fp32 rate), the prompt against the fp32 GEMM rate, decoding against read
    bandwidth. ``bundle``: the opened bundle; ``costs``: decoder costs by variant, filled as needed."""
    from ...runtime import constants as C
    from ...runtime.encoder import chunk_plan
    from .machine import decoder_cost, encoder_flops

    if peaks is None or bundle is None:
        return {}
    m = bundle.manifest
    enc_variant, dec_variant = res["variants"] or ("fp32", "f32")
    d = m.encoder.embed_dim
    patches = [spec.n_real for spec in chunk_plan(max(r["n_samples"], C.MIN_SAMPLES))]
    if res.get("legacy"):
        patches = [C.CHUNK_PATCHES] * len(patches)
    enc_peak = max(peaks.int8_gops, peaks.fp32_gflops) if enc_variant.startswith("int8") else peaks.fp32_gflops
    out = {}
    if r["encoder"]:
        out["encoder"] = encoder_flops(d, m.encoder.depth, 4 * d, patches) / r["encoder"] / 1e9 / enc_peak
    if not res["variants"]:
        return out
    if dec_variant not in costs:
        costs[dec_variant] = decoder_cost(str(bundle.variant("decoder", dec_variant)[1]))
    cost = costs[dec_variant]
    if r["prefill"]:
        out["prompt"] = cost.flops_per_position * r["positions"] / r["prefill"] / 1e9 / peaks.fp32_gflops
    # a token reads the weights and the cached positions' keys and values: on average the
    # prompt's and half the answer's
    cached = r["positions"] + r["new_tokens"] / 2
    out["decode"] = cost.bytes_read(cached) * r["decode_tok_s"] / 1e9 / peaks.read_gbs
    return out


def format_bench(results: list[dict[str, Any]], *, bundle: str | Path | None = None, peaks: Any = None) -> str:
    """Markdown table: per configuration and clip, times, ratios to the reference on the same
    clip, and each stage as a fraction of the machine's measured rate (``peaks``); then the goals."""
    has_ref = results[0]["config"] == REFERENCE
    ref = {r["clip"]: r for r in results[0]["clips"]} if has_ref else {}
    lines = [peaks.header(), ""] if peaks is not None else []
    repeats = results[0].get("repeats", 1)
    if repeats > 1:
        lines += [f"each clip {repeats} times in a row; every time and rate is the median of its runs, peak RSS the largest", ""]
    lines += ["| configuration | clip | time to first token (s) | total (s) | TTFT vs reference | total vs reference | real-time factor | "
              "encoder s (% of GEMM peak) | prompt s / positions (% of fp32 GEMM) | decode tok/s (% of read bandwidth) | load (s) | peak RSS (GB) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    from ...runtime.bundle import Bundle

    opened = Bundle.open(bundle) if bundle and peaks is not None else None
    costs: dict[str, Any] = {}
    fractions: dict[tuple[str, int], dict[str, float]] = {}
    for res in results:
        for r in res["clips"]:
            base = ref.get(r["clip"])
            frac = fractions[res["config"], round(r["seconds"])] = _fractions(res, r, opened, peaks, costs)
            f_enc, f_pre, f_bw = (f"{frac[k]:.0%}" if k in frac else "" for k in ("encoder", "prompt", "decode"))
            ttft_ratio = f"{r['ttft'] / base['ttft']:.2f}x" if base else "-"
            total_ratio = f"{base['total'] / r['total']:.1f}x faster" if base else "-"
            lines.append(
                f"| {res['config']} | {r['seconds']:g} s | {r['ttft']:.2f} | {r['total']:.2f} | {ttft_ratio} | {total_ratio} | {r['total'] / r['seconds']:.3f} | "
                f"{r['encoder']:.2f}{f' ({f_enc})' if f_enc else ''} | {r['prefill']:.2f} / {r['positions']}{f' ({f_pre})' if f_pre else ''} | "
                f"{r['decode_tok_s']:.1f}{f' ({f_bw})' if f_bw else ''} | {res['load_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    repacked = [r["config"] for r in results if r.get("repacked")]
    lines += ["", f"decoder weights repacked for this CPU (ggml's extra buffer types): {', '.join(repacked) if repacked else 'none'}"]
    lines += ["", *goal_lines(results, fractions)]
    return "\n".join(lines)


def _by_seconds(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A configuration's clip rows by whole clip seconds."""
    return {round(r["seconds"]): r for r in result["clips"]}


def goal_lines(results: list[dict[str, Any]], fractions: dict[tuple[str, int], dict[str, float]] | None = None) -> list[str]:
    """The goals, met or not, for int8 + Q4_K_M (else the last runtime configuration as it runs by
    default, neither legacy nor with the prompt moved to llama.cpp);
    with ``fractions`` (by configuration and whole clip seconds, from :func:`_fractions`) each stage's
    share of the machine's rate too."""
    out: list[str] = []
    runtime = [r for r in results if r["variants"] and not r.get("legacy") and not r.get("llama_prompt")]
    if not runtime:
        return out
    fast = next((r for r in runtime if r["config"] == GOAL_CONFIG), runtime[-1])
    by_len = _by_seconds(fast)
    ref = _by_seconds(results[0]) if results[0]["config"] == REFERENCE else {}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for s in GOAL_CLIPS:
        if s in by_len and s in ref:
            r, b = by_len[s], ref[s]
            tt, tot = r["ttft"] / b["ttft"], b["total"] / r["total"]
            out.append(f"goal ({fast['config']}, {s:g} s clip): total {tot:.1f}x faster (>= {GOALS['total']}: {verdict(tot >= GOALS['total'])}), "
                       f"time to first token {tt:.2f}x the reference's (<= {GOALS['ttft']} on AVX-512 CPUs: {verdict(tt <= GOALS['ttft'])})")
    if 30 in by_len:
        r = by_len[30]
        out.append(f"goal ({fast['config']}, 30 s clip): peak RSS {r['peak_rss_gb']:.2f} GB (<= {GOALS['peak_rss_gb']}: "
                   f"{verdict(r['peak_rss_gb'] <= GOALS['peak_rss_gb'])}), real-time factor {r['total'] / r['seconds']:.3f}")
    for s in GOAL_CLIPS:
        frac = (fractions or {}).get((fast["config"], round(s)), {})
        if frac:
            parts = [f"{STAGE_GOALS[k][1]} {frac[k]:.0%} of {STAGE_GOALS[k][2]} (>= {STAGE_GOALS[k][0]:.0%}: {verdict(frac[k] >= STAGE_GOALS[k][0])})"
                     for k in STAGE_GOALS if k in frac]
            out.append(f"goal ({fast['config']}, {s:g} s clip): " + ", ".join(parts))
    # the same pair run another way in the same run: the prompt in llama.cpp, and the legacy configuration
    for flag, label, third in (("llama_prompt", "prompt in llama.cpp", "total"), ("legacy", "legacy", "encoder")):
        other = next((r for r in results if r.get(flag)), None)
        o = _by_seconds(other) if other else {}
        for s, r in sorted(by_len.items()):
            if s in o:
                out.append(f"{fast['config']} vs {label}, {s:g} s clip: time to first token {r['ttft'] / o[s]['ttft']:.2f}x, "
                           f"prompt {r['prefill'] / o[s]['prefill']:.2f}x, {third} {r[third] / o[s][third]:.2f}x")
    return out


# -- many sequences at once --------------------------------------------------------------------------
PARALLEL = (1, 2, 4, 8)
PARALLEL_GOALS = {"decode_4": 2.0, "decode_8": 2.5, "files_4": 1.6, "rss_4_gb": 0.3}


def _parallel_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One decoder variant at one parallelism: every (clip, new tokens) workload, each over
    ``files`` copies of the clip (stop tokens ignored, so all do the same work)."""
    from ...runtime.options import DecoderOptions, GenerationOptions
    from ...runtime.pipeline import AudioLM, Request

    rows = []
    decoder = DecoderOptions(variant=job["decoder"], extra_bufts=job.get("extra_bufts"))
    with AudioLM(job["bundle"], encoder="int8", decoder=decoder, threads=job["threads"]) as lm:
        warm = [Request(audio=job["clips"][0], options=GenerationOptions(max_new_tokens=2, ignore_eos=True))]
        list(lm.run(warm, parallel=job["parallel"]))
        for clip, files in zip(job["clips"], job["files"]):
            for tokens in job["tokens"]:
                _reset_peak_rss()
                options = GenerationOptions(max_new_tokens=tokens, ignore_eos=True)
                stats: dict[str, float] = {}
                t = time.perf_counter()
                results = list(lm.run([Request(audio=clip, options=options, tag=i) for i in range(files)], parallel=job["parallel"], stats=stats,
                                      overlap=job.get("overlap", False)))
                wall = time.perf_counter() - t
                bad = [r for _, r in results if not hasattr(r, "token_ids")]
                if bad:
                    raise RuntimeError(f"benchmark request failed: {bad[0]}")
                rows.append({"clip": clip, "seconds": results[0][1].audio_seconds, "tokens": tokens, "files": files, "wall": wall,
                             "files_per_s": files / wall, "decode_tok_s": stats["decode_rows"] / stats["decode_seconds"] if stats["decode_seconds"] else 0.0,
                             "steps": stats["steps"], "peak_rss_gb": _peak_rss() / 1e9})
    return {"decoder": job["decoder"], "parallel": job["parallel"], "overlap": job.get("overlap", False), "rows": rows}


def run_parallel_bench(bundle: str | Path, clips: list[Path], *, decoders: tuple[str, ...] = ("Q4_K_M", "f16"), parallel: tuple[int, ...] = PARALLEL,
                       tokens: tuple[int, ...] = (32, 128), threads: int | None = None, extra_bufts: bool | None = None) -> list[dict[str, Any]]:
    """Each decoder at each parallelism in its own process (its own peak RSS); every clip is
    captioned ``max(4, 2 x parallel)`` times per workload (16 for the goal's 5 s clips)."""
    from ...runtime.errors import MdlEdgeError

    out = []
    jobs = [(dec, p, False, clips, tokens) for dec in decoders for p in parallel]
    if 4 in parallel:  # the encoder overlapped with decoding (a background thread), on the goal's workload
        jobs.append((decoders[0], 4, True, clips[:1], tokens[:1]))
    for dec, p, overlap, job_clips, job_tokens in jobs:
        job = {"mode": "parallel", "bundle": str(bundle), "decoder": dec, "parallel": p, "threads": threads, "tokens": list(job_tokens),
               "overlap": overlap, "extra_bufts": extra_bufts, "clips": [str(c) for c in job_clips],
               "files": [16 if abs(_clip_seconds(c) - 5) < 0.5 else max(4, 2 * p) for c in job_clips]}
        proc = subprocess.run([sys.executable, "-m", "mdl_edge.export.bench.end_to_end", json.dumps(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise MdlEdgeError(f"parallel benchmark worker ({dec}, {p} sequences) failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def _clip_seconds(path: str | Path) -> float:
    import soundfile as sf

    return float(sf.info(str(path)).duration)


def format_parallel(results: list[dict[str, Any]], *, bundle: str | Path, peaks: Any = None) -> str:
    """Markdown table: per decoder, clip, new tokens and parallelism, the aggregate decode rate
    (and its ratio to one sequence, and the fraction of read bandwidth its steps use), files/s
    end to end (and ratio), peak RSS; then the goals."""
    from ...runtime.bundle import Bundle
    from .machine import decoder_cost

    b = Bundle.open(bundle)
    lines = [peaks.header(), ""] if peaks is not None else []
    lines += ["| decoder | clip | new tokens | sequences | files | decode tok/s (all sequences) | vs 1 sequence | steps' share of read bandwidth | "
              "files/s | vs 1 sequence | peak RSS (GB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base: dict[tuple[str, float, int], dict[str, Any]] = {}
    goals: list[str] = []
    overlapped = [r for r in results if r.get("overlap")]
    for res in sorted((r for r in results if not r.get("overlap")), key=lambda r: (r["decoder"], r["parallel"])):
        cost = decoder_cost(str(b.variant("decoder", res["decoder"])[1]))
        for r in res["rows"]:
            key = (res["decoder"], round(r["seconds"]), r["tokens"])
            if res["parallel"] == 1:
                base[key] = r
            one = base.get(key)
            share = f"{cost.bytes_per_token * r['decode_tok_s'] / res['parallel'] / 1e9 / peaks.read_gbs:.0%}" if peaks else "-"
            dec_x = f"{r['decode_tok_s'] / one['decode_tok_s']:.2f}x" if one and one["decode_tok_s"] else "-"
            files_x = f"{r['files_per_s'] / one['files_per_s']:.2f}x" if one else "-"
            lines.append(f"| {res['decoder']} | {r['seconds']:g} s | {r['tokens']} | {res['parallel']} | {r['files']} | {r['decode_tok_s']:.1f} | {dec_x} | "
                         f"{share} | {r['files_per_s']:.2f} | {files_x} | {r['peak_rss_gb']:.2f} |")
            if res["decoder"] == "Q4_K_M" and one and res["parallel"] in (4, 8):
                x = r["decode_tok_s"] / one["decode_tok_s"]
                want = PARALLEL_GOALS["decode_4" if res["parallel"] == 4 else "decode_8"]
                goals.append(f"goal (Q4_K_M, {r['seconds']:g} s, {r['tokens']} tokens): decode at {res['parallel']} sequences {x:.2f}x one "
                             f"(>= {want}: {'met' if x >= want else 'NOT met'})")
                if res["parallel"] == 4 and round(r["seconds"]) == 5 and r["tokens"] == 32:
                    fx, drss = r["files_per_s"] / one["files_per_s"], r["peak_rss_gb"] - one["peak_rss_gb"]
                    goals.append(f"goal (Q4_K_M, 16 clips of 5 s, 32 tokens): --parallel 4 gives {fx:.2f}x the files/s of 1 (>= {PARALLEL_GOALS['files_4']}: "
                                 f"{'met' if fx >= PARALLEL_GOALS['files_4'] else 'NOT met'}); peak RSS +{drss:.2f} GB (<= {PARALLEL_GOALS['rss_4_gb']}: "
                                 f"{'met' if drss <= PARALLEL_GOALS['rss_4_gb'] else 'NOT met'})")
    for res in overlapped:
        for r in res["rows"]:
            plain = next((x for y in results if not y.get("overlap") and y["decoder"] == res["decoder"] and y["parallel"] == res["parallel"]
                          for x in y["rows"] if x["clip"] == r["clip"] and x["tokens"] == r["tokens"]), None)
            if plain:
                goals.append(f"encoder overlapped with decoding ({res['decoder']}, {res['parallel']} sequences, {r['files']} clips of {r['seconds']:g} s, "
                             f"{r['tokens']} tokens): {r['files_per_s']:.2f} files/s vs {plain['files_per_s']:.2f} in turn "
                             f"({r['files_per_s'] / plain['files_per_s']:.2f}x)")
    return "\n".join(lines + [""] + goals)


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(_parallel_worker(a) if a.get("mode") == "parallel" else _worker(a)))
