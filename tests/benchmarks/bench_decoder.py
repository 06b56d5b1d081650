"""Decoder benchmark: llama.cpp GGUF variants vs transformers fp32 on the same weights.

    python tests/benchmarks/bench_decoder.py --model CKPT --work DIR [--tokens 64]

CKPT is a real-size checkpoint (``mdl-edge synth --preset 0.6b``); DIR receives the f16 GGUF
and its Q8_0 / Q4_K_M quantizations when missing. Measured in one run: memory read bandwidth,
then per variant and thread count the prefill rate (250 audio embeddings + the prompt text,
from an empty cache) and the greedy decode rate, each variant's decode rate as a fraction of
its bandwidth limit (all weight bytes are read per token: the tied head reads the embedding
matrix), and our Python generation loop against a bare loop of ``llama_decode`` calls.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import best_of


def bandwidth_gbs() -> float:
    x = np.ones(256 * 2**20 // 8 * 4, np.float64)  # 1 GiB
    s = best_of(lambda: x.sum(), 3, warmup=True)
    return x.nbytes / s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of our loop and the bare loop (best of each)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from mdl_edge.export.gguf_decoder import export_decoder_gguf
    from mdl_edge.export.reference_model import MiDashengLM
    from mdl_edge.quantize.decoder import quantize_decoder
    from mdl_edge.runtime.decoder import LlamaDecoder, Segment, split_prompt
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

    ref = MiDashengLM.from_pretrained(args.model)
    n_audio = 250
    rng = np.random.default_rng(0)
    emb_std = float(ref.decoder.get_input_embeddings().weight[:1000].detach().std())
    audio = (rng.standard_normal((n_audio, ref.cfg.decoder.hidden_size)) * emb_std).astype(np.float32)
    ids = ref.prompt.encode(user_message("Caption the audio."), [n_audio])
    segs = split_prompt(ids, [audio], ref.cfg.audio_token_id)
    bw = bandwidth_gbs()
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            embeds = ref.embed_prompt(ids, [torch.from_numpy(audio)])
            t_pre = best_of(lambda: ref.decoder(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1), 1, warmup=True)
            t = time.perf_counter()
            toks, _, _ = ref.generate_from_embeds(embeds, max_new_tokens=args.tokens // 2, stop_ids=[])
            t_all = time.perf_counter() - t
        rows.append({"variant": "transformers fp32", "threads": threads, "prefill_tok_s": len(ids) / t_pre,
                     "decode_tok_s": len(toks) / max(t_all - t_pre, 1e-9), "size_gb": None})
        for name, path in variants.items():
            with LlamaDecoder(path, n_ctx=1024, threads=threads) as dec:
                def prefill() -> None:
                    dec.reset()
                    dec.evaluate(segs)

                t_pre = best_of(prefill, 2, warmup=True)
                n = args.tokens

                def ours() -> None:
                    prefill()
                    t = time.perf_counter()
                    assert len(list(dec.generate(segs, max_new_tokens=n, stop_ids=[]))) == n
                    times.append(time.perf_counter() - t)

                def bare() -> None:
                    # the same number of llama_decode calls from the same cache state, no sampling
                    prefill()
                    t = time.perf_counter()
                    for k in range(n):
                        dec._decode(Segment(tokens=(int(ids[-1]),)), len(ids) + k, want_logits=True)
                    bare_times.append(time.perf_counter() - t)

                times: list[float] = []
                bare_times: list[float] = []
                for _ in range(args.repeats):  # interleaved, best of each: machine noise hits both alike
                    ours()
                    bare()
                t_dec, t_bare = min(times), min(bare_times)
            size = path.stat().st_size / 1e9
            rate = n / t_dec
            rows.append({"variant": f"llama.cpp {name}", "threads": threads, "prefill_tok_s": len(ids) / t_pre, "decode_tok_s": rate,
                         "size_gb": size, "bandwidth_fraction": rate * size / bw, "python_overhead": (t_dec - t_bare) / t_bare})
    base = {r["threads"]: r for r in rows if r["variant"] == "transformers fp32"}
    print(f"memory read bandwidth: {bw:.1f} GB/s (numpy sum, 1 thread); prompt {len(ids)} positions ({n_audio} audio)\n")
    print("| decoder | threads | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | weights GB | of bandwidth limit | Python loop overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base[r["threads"]]
        print(f"| {r['variant']} | {r['threads']} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / b['prefill_tok_s']:.1f}x | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / b['decode_tok_s']:.1f}x | {r['size_gb'] or 0:.2f} | "
              f"{r.get('bandwidth_fraction', 0) * 100:.0f}% | {r.get('python_overhead', 0) * 100:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
