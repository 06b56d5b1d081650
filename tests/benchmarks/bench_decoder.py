"""Decoder benchmark: llama.cpp GGUF variants vs transformers fp32 on the same weights, and where
a decoded token's time goes.

    python tests/benchmarks/bench_decoder.py --model CKPT --work DIR [--tokens 64] [--contexts 33,168,400]

CKPT is a real-size checkpoint (``mdl-edge synth --preset 0.6b``); DIR receives the f16 GGUF
and its Q8_0 / Q4_K_M quantizations when missing. Measured in one run, on this machine:

1. Memory read bandwidth (the rate ``mdl-edge bench`` judges decoding by; read before and after
   the runs, the higher kept), then per variant and
   thread count the prefill rate (250 audio embeddings + the prompt text, from an empty cache)
   and the greedy decode rate, each variant's decode rate as a fraction of its bandwidth limit
   (all weight bytes are read per token, the tied head reading the embedding matrix, and so are
   the f16 keys and values of every cached position), and our
   generation loop (``LlamaDecoder.generate``) against the same loop in C (``bare_decode.c``,
   built here against llama-cpp-python's own ``libllama`` and headers, with the same settings;
   runs interleaved, best of each). Separate runs differ by machine noise (several % here), so
   the loop's own cost is also measured inside each run: the time outside its two C calls per
   token (sample, decode) over the time in them.
2. Where a decoded token's time goes, per variant at the most threads: the same step with and
   without its logits (llama.cpp skips the output matrix when no logits are asked for), so the
   output matrix's share and each part's streaming rate against the read bandwidth.
3. The decode rate as the context grows, with flash attention on (the default) and off: the
   attention's own cost per cached position.

Each variant decodes with the weights the runtime gives it: quantized ones with ggml's repacking
on where the runtime turns it on (its prompt engine in use: int8 dot products, a build that
repacks safely; ggml then repacks the types it has kernels for on this CPU, e.g. Q4_K on x86 but
not Q6_K or Q8_0), read rather than mapped; the others mapped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from common import best_of

def build_bare_decode(out_dir: Path) -> Path | None:
    """Compile bare_decode.c against the installed llama-cpp-python (None without a compiler)."""
    import llama_cpp

    cc = shutil.which(os.environ.get("CC", "cc"))
    pkg = Path(llama_cpp.__file__).parent
    include = pkg.parent / "include"
    if cc is None or not (include / "llama.h").exists():
        return None
    exe = out_dir / "bare_decode"
    lib = pkg / "lib"
    subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).with_name("bare_decode.c")), f"-I{include}", f"-L{lib}", "-lllama",
                    f"-Wl,-rpath,{lib}"], check=True)
    return exe


class TimedLib:
    """llama_cpp with the generation loop's C calls timed from its first sample on (the prompt's
    evaluation before it is not the loop's): the rest of the loop's time is Python's."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.c_s = 0.0
        self._sampling = False

    def __getattr__(self, name: str) -> object:
        f = getattr(self._lib, name)
        if name not in ("llama_decode", "llama_sampler_sample"):
            return f

        def timed(*a: object) -> object:
            self._sampling = self._sampling or name == "llama_sampler_sample"
            t = time.perf_counter()
            r = f(*a)
            if self._sampling:
                self.c_s += time.perf_counter() - t
            return r

        return timed


def repacked_by_runtime(path: Path) -> bool:
    """Whether the runtime decodes the GGUF at ``path`` on repacked weights: where its prompt
    engine would evaluate the prompts, on a build that repacks safely (``Bundle.load_decoder``)."""
    from mdl_edge.runtime.bundle import engine_by_default
    from mdl_edge.runtime.decoder import extra_bufts_safe
    from mdl_edge.runtime.gguf_meta import read_gguf_metadata
    from mdl_edge.runtime.options import DecoderOptions

    return engine_by_default(DecoderOptions(), read_gguf_metadata(path)) and extra_bufts_safe()


def some_tokens(dec: object, n: int, offset: int = 0) -> list[int]:
    """``n`` ordinary token ids of ``dec``'s vocabulary (what they say does not matter here)."""
    span = min(1000, dec.n_vocab // 2)
    return [100 + (offset + i) % span for i in range(n)]


def decode_steps(dec: object, rows: np.ndarray, start: int, want_logits: bool) -> float:
    """Seconds to decode ``rows`` one position at a time after ``start`` cached positions."""
    t = time.perf_counter()
    for k in range(rows.shape[0]):
        dec.decode_rows(rows[k : k + 1], [start + k], [0], [want_logits])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each configuration (best of each)")
    ap.add_argument("--contexts", default="33,168,400", help="cached positions before the decoded tokens (table 3; "
                    "the 0.6B prompts of 3 and 30 s clips, and a long answer's)")
    ap.add_argument("--threads", default="1,2", help="thread counts of table 1; tables 2 and 3 use the most")
    ap.add_argument("--json")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]

    import torch

    from mdl_edge.export.bench.machine import decoder_cost, read_bandwidth
    from mdl_edge.export.convert.gguf_decoder import export_decoder_gguf
    from mdl_edge.export.reference.model import MiDashengLM
    from mdl_edge.quantize.decoder import quantize_decoder
    from mdl_edge.runtime.cpu import cpu_info
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.options import SamplingOptions
    from mdl_edge.runtime.prompt import split_prompt, user_message

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "decoder.f16.gguf"
    if not f16.exists():
        export_decoder_gguf(args.model, f16, out_type="f16")
    variants = {"f16": f16}
    for q in ("Q8_0", "Q4_K_M"):
        p = work / f"decoder.{q}.gguf"
        if not p.exists():
            quantize_decoder(f16, p, q)
        variants[q] = p

    bare_exe = build_bare_decode(work)
    ref = MiDashengLM.from_pretrained(args.model)
    n_audio = 250
    rng = np.random.default_rng(0)
    emb_std = float(ref.decoder.get_input_embeddings().weight[:1000].detach().std())
    audio = (rng.standard_normal((n_audio, ref.cfg.decoder.hidden_size)) * emb_std).astype(np.float32)
    ids = ref.prompt.encode(user_message("Caption the audio."), [n_audio])
    segs = split_prompt(ids, [audio], ref.cfg.audio_token_id)
    bw = {t: read_bandwidth(t) for t in thread_counts}
    n = args.tokens
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            embeds = ref.embed_prompt(ids, [torch.from_numpy(audio)])
            t_pre = best_of(lambda: ref.decoder(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1), 1, warmup=True)
            t = time.perf_counter()
            toks, _, _ = ref.generate_from_embeds(embeds, max_new_tokens=max(n // 2, 1), stop_ids=[])
            t_all = time.perf_counter() - t
        rate = len(toks) / max(t_all - t_pre, 1e-9)
        size = sum(t.numel() * t.element_size() for t in ref.decoder.parameters()) / 1e9  # tied head counted once
        rows.append({"variant": "transformers fp32", "threads": threads, "prefill_tok_s": len(ids) / t_pre,
                     "decode_tok_s": rate, "size_gb": size, "bandwidth_fraction": rate * size / bw[threads]})
        for name, path in variants.items():
            repack = repacked_by_runtime(path)
            with LlamaDecoder(path, n_ctx=1024, threads=threads, extra_bufts=repack) as dec:
                def prefill() -> None:
                    dec.reset()
                    dec.evaluate(segs)

                t_pre = best_of(prefill, 2, warmup=True)

                def ours() -> None:
                    prefill()  # generate() then re-evaluates only the prompt's last segment
                    lib = dec._L  # noqa: SLF001 (the benchmark times the C calls under the loop)
                    timed = dec._L = TimedLib(lib)  # noqa: SLF001
                    try:
                        res = dec.generate(segs, max_new_tokens=n, sampling=SamplingOptions()).result()
                    finally:
                        dec._L = lib  # noqa: SLF001
                    assert len(res.token_ids) == n, res
                    times.append(res.decode_s)
                    py_share.append((res.decode_s - timed.c_s) / timed.c_s)

                def bare() -> None:
                    # the same greedy sample + llama_decode steps from a cache of the same length, in C
                    if bare_exe is None:
                        return
                    out = subprocess.run([str(bare_exe), str(path), str(len(ids)), str(n), str(threads), str(int(dec.flash_attn)),
                                          str(int(repack))], check=True, capture_output=True, text=True).stdout
                    bare_times.append(json.loads(out)["decode_s"])

                times: list[float] = []
                bare_times: list[float] = []
                py_share: list[float] = []
                for _ in range(args.repeats):  # interleaved, best of each: machine noise hits both alike
                    ours()
                    bare()
                t_dec = min(times)
                t_bare = min(bare_times) if bare_times else float("nan")
            size = decoder_cost(str(path)).bytes_read(len(ids) + n / 2) / 1e9  # weights, and the cached positions' keys and values
            rate = n / t_dec
            rows.append({"variant": f"llama.cpp {name}", "threads": threads, "repacked": repack, "prefill_tok_s": len(ids) / t_pre,
                         "decode_tok_s": rate, "size_gb": size, "bandwidth_fraction": rate * size / bw[threads],
                         "python_overhead": (t_dec - t_bare) / t_bare, "python_share": min(py_share)})

    threads = max(thread_counts)
    split_rows = decode_split(variants, threads, n, args.repeats)
    context_rows = decode_by_context(variants["Q4_K_M"], threads, n, contexts, args.repeats)
    # the host's speed moves during a run: a fraction of a rate read low would flatter, so the
    # rate is read again after the runs and the higher reading kept (as `mdl-edge bench` does)
    bw = {t: max(bw[t], read_bandwidth(t)) for t in thread_counts}
    for r in rows:
        r["bandwidth_fraction"] = r["decode_tok_s"] * r["size_gb"] / bw[r["threads"]]

    info = cpu_info()
    base = {r["threads"]: r for r in rows if r["variant"] == "transformers fp32"}
    print(f"CPU: {info.describe()}")
    print("memory read bandwidth (1 GiB sum; the higher of two readings, before and after the runs): "
          + ", ".join(f"{bw[t]:.1f} GB/s at {t} thread(s)" for t in thread_counts)
          + f"; prompt {len(ids)} positions ({n_audio} audio), {n} tokens decoded\n")
    print("| decoder | threads | weights | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | read per token (MB: weights, KV cache) | "
          "of read bandwidth | our loop vs C loop | Python time / C time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base[r["threads"]]
        weights = "-" if "repacked" not in r else ("repack on" if r["repacked"] else "mapped")
        print(f"| {r['variant']} | {r['threads']} | {weights} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / b['prefill_tok_s']:.1f}x | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / b['decode_tok_s']:.1f}x | {r['size_gb'] * 1e3:.1f} | "
              f"{r['bandwidth_fraction'] * 100:.0f}% | " + (f"{r['python_overhead'] * 100:+.1f}% | {r['python_share'] * 100:.2f}% |"
                                                           if "python_share" in r else "- | - |"))

    print(f"\nWhere a decoded token's time goes ({threads} threads, {n} tokens after the {len(ids)}-position prompt's "
          f"length of cache, best of {args.repeats} interleaved; the output matrix is the step with logits less the step without):\n")
    print("| decoder | weights | ms per token | of it, output matrix ms | output matrix MB, GB/s (of read bw) | "
          "the rest ms | the rest MB, GB/s (of read bw) | whole step GB/s (of read bw) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in split_rows:
        full, rest = r["ms_with_logits"], r["ms_without_logits"]
        head = full - rest

        def rate(gb: float, ms: float) -> str:
            return f"{gb / ms * 1e3:.1f} ({gb / ms * 1e3 / bw[threads]:.0%})" if ms > 0 else "-"

        print(f"| {r['variant']} | {'repack on' if r['repacked'] else 'mapped'} | {full:.2f} | {head:.2f} ({head / full:.0%}) | "
              f"{r['head_gb'] * 1e3:.1f}, {rate(r['head_gb'], head)} | {rest:.2f} | {r['rest_gb'] * 1e3:.1f}, {rate(r['rest_gb'], rest)} | "
              f"{rate(r['head_gb'] + r['rest_gb'], full)} |")

    print(f"\nQ4_K_M decode rate as the context grows ({threads} threads, {n} tokens after each number of cached positions, "
          f"best of {args.repeats} interleaved):\n")
    print("| cached positions | flash attention tok/s | without tok/s | without / with |")
    print("|---:|---:|---:|---:|")
    for r in context_rows:
        print(f"| {r['context']} | {r['fa_tok_s']:.1f} | {r['no_fa_tok_s']:.1f} | {r['no_fa_tok_s'] / r['fa_tok_s']:.2f}x |")
    if len(context_rows) > 1:
        a, b = context_rows[0], context_rows[-1]
        span = b["context"] - a["context"]
        per = {k: (1 / b[k] - 1 / a[k]) / span * 1e6 for k in ("fa_tok_s", "no_fa_tok_s")}
        print(f"\nflash attention's cost per cached position ({a['context']} -> {b['context']}): {per['fa_tok_s']:.1f} us a token; "
              f"without it {per['no_fa_tok_s']:.1f} us, but it attends over the cache padded to a multiple of 256 cells "
              "(llama.cpp's padding), so a short context pays for 256")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": info.describe(), "bandwidth_gbs": bw, "variants": rows, "split": split_rows,
                                               "contexts": context_rows}, indent=2))


def decode_split(variants: dict[str, Path], threads: int, n: int, repeats: int) -> list[dict]:
    """Per quantized or f16 variant: ms per decoded token with and without its logits."""
    from mdl_edge.export.bench.machine import decoder_cost
    from mdl_edge.runtime.decoder import LlamaDecoder, Segment

    out = []
    for name, path in variants.items():
        repack = repacked_by_runtime(path)
        with LlamaDecoder(path, n_ctx=1024, threads=threads, extra_bufts=repack) as dec:
            prompt = Segment(tokens=tuple(some_tokens(dec, 268)))
            rows = dec.token_rows(some_tokens(dec, n, offset=500))
            best = {True: float("inf"), False: float("inf")}
            for _ in range(repeats):
                for want in (True, False):
                    dec.reset()
                    dec.evaluate([prompt])
                    best[want] = min(best[want], decode_steps(dec, rows, len(prompt), want))
        cost = decoder_cost(str(path))
        out.append({"variant": name, "repacked": repack, "ms_with_logits": best[True] / n * 1e3, "ms_without_logits": best[False] / n * 1e3,
                    "head_gb": cost.output_bytes / 1e9, "rest_gb": (cost.bytes_read(len(prompt) + n / 2) - cost.output_bytes) / 1e9})
    return out


def decode_by_context(path: Path, threads: int, n: int, contexts: list[int], repeats: int) -> list[dict]:
    """Decode tok/s after each number of cached positions, flash attention on and off."""
    from mdl_edge.runtime.decoder import LlamaDecoder, Segment

    repack = repacked_by_runtime(path)
    decs = {fa: LlamaDecoder(path, n_ctx=max(1024, max(contexts) + n + 1), threads=threads, flash_attn=fa, extra_bufts=repack)
            for fa in (True, False)}
    try:
        rows = decs[True].token_rows(some_tokens(decs[True], n, offset=500))
        out = []
        for ctx in contexts:
            prompt = Segment(tokens=tuple(some_tokens(decs[True], ctx)))
            best = {True: float("inf"), False: float("inf")}
            for _ in range(repeats):
                for fa, dec in decs.items():
                    dec.reset()
                    dec.evaluate([prompt])
                    best[fa] = min(best[fa], decode_steps(dec, rows, ctx, True))
            out.append({"context": ctx, "fa_tok_s": n / best[True], "no_fa_tok_s": n / best[False]})
        return out
    finally:
        for dec in decs.values():
            dec.close()


if __name__ == "__main__":
    main()
