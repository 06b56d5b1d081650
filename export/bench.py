"""End-to-end benchmark: the PyTorch reference vs runtime bundles, each in its own process.

Every configuration runs in a fresh subprocess (so peak RSS is its own), loads its model once,
then captions each clip (decode + mel + encoder + projector + prefill + a fixed number of
greedy tokens, stop tokens ignored so every configuration does the same work). Reported per clip:
time to first token, total, real-time factor (total / audio duration), decode tokens/s; per
configuration: load time and peak RSS.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REFERENCE = "reference fp32 (PyTorch)"
DEFAULT_VARIANTS = (("fp32", "f16"), ("int8", "Q4_K_M"))
GOALS = {"speedup_30s": 5.0, "rtf_30s": 0.15, "peak_rss_gb": 1.5}


def _worker(config: str, variants: list[str] | None, model: str, bundle: str, clips: list[str], tokens: int, threads: int | None) -> dict[str, Any]:
    t = time.perf_counter()
    rows = []
    if variants is None:
        import torch

        from ..runtime.audio import load_audio
        from ..runtime.prompt import user_message
        from .reference_model import MiDashengLM

        if threads:
            torch.set_num_threads(threads)
        ref = MiDashengLM.from_pretrained(model)
        load = time.perf_counter() - t
        with torch.inference_mode():  # warm-up: first-call allocations are not the steady state
            ref.generate_from_embeds(ref.embed_prompt([0, 1, 2], []), max_new_tokens=2, stop_ids=[])
        for c in clips:
            _reset_peak_rss()
            t0 = time.perf_counter()
            wave = load_audio(c)
            with torch.inference_mode():
                (emb,) = ref.encode_audio([wave])
                ids = ref.prompt.encode(user_message("Caption the audio."), [emb.shape[0]])
                embeds = ref.embed_prompt(ids, [emb])
            t_embed = time.perf_counter() - t0
            toks, _, tm = ref.generate_from_embeds(embeds, max_new_tokens=tokens, stop_ids=[])
            total = time.perf_counter() - t0
            # the reference's first token comes out of the prefill
            rows.append({"clip": c, "seconds": wave.size / 16000, "ttft": t_embed + tm["prefill"], "total": total,
                         "decode_tok_s": max(len(toks) - 1, 1) / tm["decode"] if tm["decode"] else 0.0, "peak_rss_gb": _peak_rss() / 1e9})
    else:
        import numpy as np

        from ..runtime.options import GenerationOptions
        from ..runtime.pipeline import AudioLM
        from ..runtime.prompt import CAPTION_PROMPT

        enc, dec = variants
        lm = AudioLM(bundle, encoder=enc, decoder=dec, threads=threads)
        load = time.perf_counter() - t
        lm.generate(np.zeros(16000, np.float32), "Hi", GenerationOptions(max_new_tokens=2, ignore_eos=True), sample_rate=16000)  # warm-up
        options = GenerationOptions(max_new_tokens=tokens, ignore_eos=True)
        for c in clips:
            _reset_peak_rss()
            r = lm.generate(c, CAPTION_PROMPT, options)
            rows.append({"clip": c, "seconds": r.audio_seconds, "ttft": r.timings["time_to_first_token"], "total": r.timings["total"],
                         "decode_tok_s": r.tokens_per_second, "peak_rss_gb": _peak_rss() / 1e9})
        lm.close()
    return {"config": config, "load_s": load, "clips": rows}


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
              variants: tuple[tuple[str, str], ...] = DEFAULT_VARIANTS) -> list[dict[str, Any]]:
    """Run the reference and each (encoder, decoder) variant pair in its own process."""
    from ..runtime.bundle import Bundle
    from ..runtime.errors import MdlEdgeError

    b = Bundle.open(bundle)
    for enc, dec in variants:  # fail before any long run
        b.variant("encoder", enc)
        b.variant("decoder", dec)
    configs = [(REFERENCE, None)] + [(f"runtime {e} + {d}", [e, d]) for e, d in variants]
    results = []
    for config, pair in configs:
        job = {"config": config, "variants": pair, "model": str(model), "bundle": str(bundle), "clips": [str(c) for c in clips],
               "tokens": tokens, "threads": threads}
        proc = subprocess.run([sys.executable, "-m", "mdl_edge.export.bench", json.dumps(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise MdlEdgeError(f"benchmark worker for {config!r} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def format_bench(results: list[dict[str, Any]]) -> str:
    """Markdown table, speedups against the reference on the same clip, and the goals."""
    ref = {r["clip"]: r for r in results[0]["clips"]}
    lines = ["| configuration | clip | time to first token (s) | total (s) | vs reference | real-time factor | decode tok/s | load (s) | peak RSS (GB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for r in res["clips"]:
            lines.append(f"| {res['config']} | {r['seconds']:.0f} s | {r['ttft']:.2f} | {r['total']:.2f} | {ref[r['clip']]['total'] / r['total']:.1f}x | "
                         f"{r['total'] / r['seconds']:.3f} | {r['decode_tok_s']:.1f} | {res['load_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    fast = results[-1]
    c30 = [r for r in fast["clips"] if abs(r["seconds"] - 30) < 1]
    if c30:
        r = c30[0]
        speed, rtf = ref[r["clip"]]["total"] / r["total"], r["total"] / r["seconds"]
        lines.append("")
        lines.append(f"goals ({fast['config']}, 30 s clip): speedup {speed:.1f}x (goal >= {GOALS['speedup_30s']:g}x: {'met' if speed >= GOALS['speedup_30s'] else 'NOT met'}), "
                     f"real-time factor {rtf:.3f} (goal <= {GOALS['rtf_30s']}: {'met' if rtf <= GOALS['rtf_30s'] else 'NOT met'}), "
                     f"peak RSS {r['peak_rss_gb']:.2f} GB (goal <= {GOALS['peak_rss_gb']}: {'met' if r['peak_rss_gb'] <= GOALS['peak_rss_gb'] else 'NOT met'})")
    return "\n".join(lines)


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(_worker(a["config"], a["variants"], a["model"], a["bundle"], a["clips"], a["tokens"], a["threads"])))
