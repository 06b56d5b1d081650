"""Prompt evaluation (prefill) speed of GGUF decoders, with ggml's repacked weights and without.

    python tests/benchmarks/bench_prefill.py DECODER.gguf [...] [--positions 33,59,159] [--threads 2] [--repeats 5]

Per file and prompt length: positions per second of llama.cpp evaluating that many audio
embedding rows from an empty cache, plain weights against ``extra_bufts=True`` (weights repacked
for this CPU's SIMD kernels), the two decoders loaded side by side and timed interleaved, best of
``--repeats``. The default lengths are the 0.6B prompts of 3, 10 and 30 s clips.

Repacking is refused on llama.cpp builds with AMX (``extra_bufts_safe``), so on an AMX CPU run the
script once as installed and once with a build without AMX on ``PYTHONPATH`` (built with
``CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"``); the table says
which build it ran.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import best_of_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--positions", default="33,59,159", help="prompt lengths, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import llama_cpp

    from mdl_edge.runtime.cpu import cpu_info
    from mdl_edge.runtime.decoder import LlamaDecoder, extra_bufts_safe
    from mdl_edge.runtime.prompt import Segment

    lengths = [int(x) for x in args.positions.split(",")]
    safe = extra_bufts_safe()
    build = "without AMX" if safe else "with AMX (repacking refused)"
    print(f"CPU: {cpu_info().describe()}; {args.threads} threads")
    print(f"llama-cpp-python {llama_cpp.__version__} at {Path(llama_cpp.__file__).parent}, built {build}\n")
    print("| decoder | weights | positions | best ms | positions/s | vs plain |")
    print("|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for path in args.gguf:
        decoders = {"plain": LlamaDecoder(path, n_ctx=1024, threads=args.threads)}
        if safe:
            decoders["repacked"] = LlamaDecoder(path, n_ctx=1024, threads=args.threads, extra_bufts=True)
        try:
            for n in lengths:
                prompt = [Segment(embeddings=(rng.standard_normal((n, decoders["plain"].n_embd)) * 0.02).astype(np.float32))]

                def prefill(dec: LlamaDecoder) -> None:
                    dec.reset()  # each prompt from an empty cache
                    dec.evaluate(prompt)

                best = best_of_interleaved({name: (lambda d=dec: prefill(d)) for name, dec in decoders.items()}, args.repeats)
                for name, s in best.items():
                    print(f"| {path.name} | {name} | {n} | {s * 1000:.0f} | {n / s:.0f} | {best['plain'] / s:.2f}x |", flush=True)
        finally:
            for dec in decoders.values():
                dec.close()


if __name__ == "__main__":
    main()
