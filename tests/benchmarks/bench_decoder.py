"""Decoder benchmark: llama.cpp GGUF variants vs transformers fp32 on the same weights.

    python tests/benchmarks/bench_decoder.py --model CKPT --work DIR [--tokens 64]

CKPT is a real-size checkpoint (``mdl-edge synth --preset 0.6b``); DIR receives the f16 GGUF
and its Q8_0 / Q4_K_M quantizations when missing. Measured in one run: memory read bandwidth,
then per variant and thread count the prefill rate (250 audio embeddings + the prompt text,
from an empty cache) and the greedy decode rate, each variant's decode rate as a fraction of
its bandwidth limit (all weight bytes are read per token: the tied head reads the embedding
matrix), and our Python generation loop against the same loop in C (``bare_decode.c``, built
here against llama-cpp-python's own ``libllama`` and headers; runs interleaved, best of each).
Separate runs differ by machine noise (several % here), so the loop's own cost is also measured
inside each run: the time outside its two C calls per token (sample, decode) over the time in them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from common import best_of


def build_bare_decode(out_dir: Path) -> Path | None:
    """Compile bare_decode.c against the installed llama-cpp-python (None without a compiler)."""
    import os
    import shutil
    import subprocess

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
    """llama_cpp with its per-token C calls timed: the rest of our loop's time is Python's."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.c_s = 0.0

    def __getattr__(self, name: str) -> object:
        f = getattr(self._lib, name)
        if name not in ("llama_decode", "llama_sampler_sample"):
            return f

        def timed(*a: object) -> object:
            t = time.perf_counter()
            r = f(*a)
            self.c_s += time.perf_counter() - t
            return r

        return timed


def bandwidth_gbs(threads: int) -> float:
    """Memory read rate of a 1 GiB float32 sum with ``threads`` torch threads (what a decode
    step does with the weights: stream them once)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)  # 1 GiB
    s = best_of(lambda: x.sum(), 3, warmup=True)
    return x.numel() * 4 / s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of our loop and the bare loop (best of each)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from mdl_edge.export.convert.gguf_decoder import export_decoder_gguf
    from mdl_edge.export.reference.model import MiDashengLM
    from mdl_edge.quantize.decoder import quantize_decoder
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import split_prompt
    from mdl_edge.runtime.options import SamplingOptions
    from mdl_edge.runtime.prompt import user_message

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
    bw = {t: bandwidth_gbs(t) for t in (1, 2)}
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            embeds = ref.embed_prompt(ids, [torch.from_numpy(audio)])
            t_pre = best_of(lambda: ref.decoder(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1), 1, warmup=True)
            t = time.perf_counter()
            toks, _, _ = ref.generate_from_embeds(embeds, max_new_tokens=args.tokens // 2, stop_ids=[])
            t_all = time.perf_counter() - t
        rate = len(toks) / max(t_all - t_pre, 1e-9)
        size = sum(t.numel() * t.element_size() for t in ref.decoder.parameters()) / 1e9  # tied head counted once
        rows.append({"variant": "transformers fp32", "threads": threads, "prefill_tok_s": len(ids) / t_pre,
                     "decode_tok_s": rate, "size_gb": size, "bandwidth_fraction": rate * size / bw[threads]})
        for name, path in variants.items():
            with LlamaDecoder(path, n_ctx=1024, threads=threads) as dec:
                def prefill() -> None:
                    dec.reset()
                    dec.evaluate(segs)

                t_pre = best_of(prefill, 2, warmup=True)
                n = args.tokens

                def ours() -> None:
                    prefill()
                    lib, dec._L = dec._L, TimedLib(dec._L)
                    t = time.perf_counter()
                    # our sampling loop straight after the prefill, as generate runs it
                    toks: list[int] = []
                    for _ in dec._sample(toks, [], n, (), SamplingOptions()):
                        pass
                    assert len(toks) == n
                    times.append(time.perf_counter() - t)
                    py_share.append((times[-1] - dec._L.c_s) / dec._L.c_s)
                    dec._L = lib

                def bare() -> None:
                    # the same greedy sample + llama_decode steps from a cache of the same length, in C
                    if bare_exe is None:
                        return
                    out = subprocess.run([str(bare_exe), str(path), str(len(ids)), str(n), str(threads)], check=True,
                                         capture_output=True, text=True).stdout
                    bare_times.append(json.loads(out)["decode_s"])

                times: list[float] = []
                bare_times: list[float] = []
                py_share: list[float] = []
                for _ in range(args.repeats):  # interleaved, best of each: machine noise hits both alike
                    ours()
                    bare()
                t_dec = min(times)
                t_bare = min(bare_times) if bare_times else float("nan")
            size = path.stat().st_size / 1e9
            rate = n / t_dec
            rows.append({"variant": f"llama.cpp {name}", "threads": threads, "prefill_tok_s": len(ids) / t_pre, "decode_tok_s": rate,
                         "size_gb": size, "bandwidth_fraction": rate * size / bw[threads], "python_overhead": (t_dec - t_bare) / t_bare,
                         "python_share": min(py_share)})
    base = {r["threads"]: r for r in rows if r["variant"] == "transformers fp32"}
    print(f"memory read bandwidth (1 GiB sum): {bw[1]:.1f} GB/s at 1 thread, {bw[2]:.1f} GB/s at 2; "
          f"prompt {len(ids)} positions ({n_audio} audio)\n")
    print("| decoder | threads | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | weights GB | of bandwidth limit | our loop vs C loop | Python time / C time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base[r["threads"]]
        print(f"| {r['variant']} | {r['threads']} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / b['prefill_tok_s']:.1f}x | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / b['decode_tok_s']:.1f}x | {r['size_gb']:.2f} | "
              f"{r['bandwidth_fraction'] * 100:.0f}% | " + (f"{r['python_overhead'] * 100:+.1f}% | {r['python_share'] * 100:.2f}% |"
                                                           if "python_share" in r else "- | - |"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
