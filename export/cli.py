"""The export-side commands of ``mdl-edge``: synth, train-toy, export, parity, bench, reference
and demo. They register themselves into the runtime's parser through the ``mdl_edge.commands``
entry point; this module imports nothing heavy (torch and friends load inside each command, which
first checks that the export extra is installed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..runtime.errors import MdlEdgeError
from ..runtime.options import DEFAULT_MAX_NEW_TOKENS

EXPORT_HINT = "this command needs the export extra (PyTorch, transformers): pip install 'mdl-edge[export]'"

def _need_export() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MdlEdgeError(f"{EXPORT_HINT} ({e})") from e


def _cmd_synth(args: argparse.Namespace) -> int:
    _need_export()
    from .synthetic.checkpoint import PRESETS, write_synthetic_checkpoint

    t = time.perf_counter()
    out = write_synthetic_checkpoint(args.preset, args.out, seed=args.seed, overwrite=args.force)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote synthetic '{args.preset}' checkpoint ({PRESETS[args.preset].description}) to {out}")
    print(f"{size / 2**20:.1f} MiB in {time.perf_counter() - t:.1f} s; random weights: its output text is meaningless")
    return 0


def _cmd_train_toy(args: argparse.Namespace) -> int:
    _need_export()
    from .toy.store import cached_toy_model, default_cache, ship, toy_model
    from .toy.train import TrainPlan, train_toy

    plan = TrainPlan(seed=args.seed)
    trains = bool(args.out) or not cached_toy_model(plan)[1]
    if trains:
        # The training time is only comparable across hosts (and across hours on a shared host)
        # beside the rate the host gives now: measured before and after.
        from .bench.machine import gemm_rate

        before = gemm_rate(False, plan.threads)
    if args.out:
        out = train_toy(args.out, plan)
    else:
        out = toy_model(plan)
        print(f"toy model (shipped, or cached in {default_cache()}): {out}")
    if trains:
        print(f"this host's fp32 GEMM rate ({plan.threads} threads): {before:.0f} GFLOP/s before training, "
              f"{gemm_rate(False, plan.threads):.0f} after")
    if args.evaluate:
        from .reference.model import MiDashengLM
        from .toy import world as toyworld

        model = MiDashengLM.from_pretrained(out)
        scores = toyworld.evaluate_both(lambda w, p: model.generate(w, p, max_new_tokens=48).text, args.evaluate, args.evaluate)
        print("PyTorch reference fp32:\n" + toyworld.format_scores(scores))
    if args.ship:
        print(f"shipped with the package: {ship(out, plan)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _need_export()
    from .convert.bundle import export_bundle

    t = time.perf_counter()
    print(f"exporting {args.model} -> bundle {args.out}")
    export_bundle(args.model, args.out, encoders=_variants(args.encoder), decoders=_variants(args.decoder))
    print(f"done in {time.perf_counter() - t:.1f} s")
    return 0


def _variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _cmd_parity(args: argparse.Namespace) -> int:
    _need_export()
    import json

    from .reference.parity import format_report, parity_report

    bundle = args.bundle
    if bundle is None:
        from .convert.bundle import export_bundle

        bundle = Path(tempfile.mkdtemp(prefix="mdl-edge-parity-")) / "bundle"
        print(f"no --bundle: exporting one to {bundle} (fp32 + int8 encoders; f16, Q8_0, Q4_K_M decoders)", file=sys.stderr)
        export_bundle(args.model, bundle, encoders=["fp32", "int8"], decoders=["f16", "Q8_0", "Q4_K_M"], progress=lambda m: print(m, file=sys.stderr))
    report = parity_report(args.model, bundle, device=args.device, audio=args.audio, max_new_tokens=args.max_new_tokens, threads=args.threads,
                           task_clips=args.task_clips)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    _need_export()
    import json

    import soundfile as sf

    from .bench.end_to_end import DEFAULT_CLIPS, format_bench, run_bench
    from .convert.bundle import export_bundle
    from .synthetic.checkpoint import write_synthetic_checkpoint
    from ..runtime import constants as C
    from ..runtime.audio import demo_clip
    from ..runtime.options import whole_number

    whole_number("repeats", args.repeats)  # before minutes of synthesis and export
    if args.parallel and args.repeats != 1:
        from ..runtime.errors import OptionError

        raise OptionError("repeats", "applies to the end-to-end table, not to --parallel")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / f"synth-{args.preset}"
    if not (model / "config.json").is_file():
        print(f"synthesizing '{args.preset}' into {model}", file=sys.stderr)
        write_synthetic_checkpoint(args.preset, model, overwrite=True)
    bundle = Path(args.bundle) if args.bundle else work / f"bundle-{model.name}"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting {bundle} (fp32 + int8 encoders; f16 + Q4_K_M decoders)", file=sys.stderr)
        export_bundle(model, bundle, encoders=["fp32", "int8"], decoders=["f16", "Q4_K_M"], progress=lambda m: print(m, file=sys.stderr))
    clips = []
    default_clips = "5,30" if args.parallel else "1,3,5,10,30" if args.preset == "7b" else DEFAULT_CLIPS
    for s in (float(x) for x in (args.clips or default_clips).split(",")):
        path = work / f"clip-{s:g}s.wav"
        if not path.exists():
            sf.write(path, demo_clip(s), C.SAMPLE_RATE, subtype="PCM_16")
        clips.append(path)
    args.variants_given = args.variants is not None
    args.variants = args.variants or "fp32+f16,int8+Q4_K_M"
    pairs = tuple(tuple(v.split("+")) for v in args.variants.split(","))
    if any(len(p) != 2 for p in pairs):
        raise MdlEdgeError(f"--variants wants ENCODER+DECODER pairs, got {args.variants!r}")
    from .bench.machine import measure_around
    from ..runtime.options import resolve_threads

    threads = resolve_threads(args.threads)
    if args.parallel:
        from .bench.end_to_end import format_parallel, run_parallel_bench

        decoders = tuple(v.split("+")[1] for v in args.variants.split(",")) if args.variants_given else ("Q4_K_M", "f16")
        seqs = tuple(int(x) for x in args.parallel.split(","))
        results, peaks = measure_around(threads, lambda: run_parallel_bench(
            bundle, clips, decoders=decoders, parallel=seqs, tokens=tuple(int(x) for x in args.parallel_tokens.split(",")),
            threads=args.threads, extra_bufts=args.extra_bufts))
        print(format_parallel(results, bundle=bundle, peaks=peaks))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    reference = not args.no_reference and args.preset != "7b"
    if not reference:
        print("runtime only: " + ("--no-reference" if args.no_reference else "the 7B PyTorch reference needs more memory than this benchmark assumes"),
              file=sys.stderr)
    results, peaks = measure_around(threads, lambda: run_bench(model, bundle, clips, tokens=args.tokens, threads=args.threads,
                                                               variants=pairs, reference=reference,  # type: ignore[arg-type]
                                                               legacy=not args.no_legacy, repeats=args.repeats))
    print(format_bench(results, bundle=bundle, peaks=peaks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _print_result(name: str, result, load_s: float, decode_audio_s: float, duration_s: float) -> None:
    print(f"{name}: {result.text!r}")
    t = {"decode audio": decode_audio_s, "load model": load_s, **result.timings}
    n = len(result.token_ids)
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items())
    rate = n / t["decode"] if t.get("decode") else 0.0
    print(f"  {duration_s:.2f} s audio -> {result.n_audio_tokens} audio tokens; {n} new tokens ({result.stop_reason}), {rate:.1f} tok/s")
    print(f"  timings: {parts}")


def _cmd_reference_caption(args: argparse.Namespace) -> int:
    _need_export()
    from .reference.model import MiDashengLM
    from ..runtime import constants as C
    from ..runtime.audio import load_audio

    t = time.perf_counter()
    model = MiDashengLM.from_pretrained(args.model, device=args.device, bf16_buffers=args.bf16_buffers)
    load_s = time.perf_counter() - t
    failed = 0
    for path in args.audio:
        try:
            t = time.perf_counter()
            wave = load_audio(path)
            dec_s = time.perf_counter() - t
            result = model.generate(wave, args.prompt, max_new_tokens=args.max_new_tokens)
            _print_result(path, result, load_s, dec_s, wave.size / C.SAMPLE_RATE)
        except MdlEdgeError as e:
            failed += 1
            print(f"mdl-edge: error: {e}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _need_export()
    if args.preset == "toy":
        return _demo_toy(args)
    import soundfile as sf

    from .synthetic.checkpoint import write_synthetic_checkpoint
    from ..runtime import constants as C
    from ..runtime.audio import demo_clip
    from ..runtime.options import GenerationOptions
    from ..runtime.pipeline import AudioLM

    work = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "mdl-edge-demo"
    model_dir = work / f"synth-{args.preset}-seed{args.seed}"
    bundle_dir = work / f"bundle-{args.preset}-seed{args.seed}"
    path = "PyTorch reference" if args.reference else "runtime (int8 ONNX encoder + Q4_K_M llama.cpp decoder)"
    print(f"== mdl-edge demo: {path} on a synthetic '{args.preset}' model ==")
    print("   (random weights: the pipeline is real, the caption text is meaningless; the default --preset toy hears)")
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        write_synthetic_checkpoint(args.preset, model_dir, seed=args.seed, overwrite=True)
        print(f"1. synthesized checkpoint {model_dir} in {time.perf_counter() - t:.1f} s")
    else:
        print(f"1. reusing synthesized checkpoint {model_dir}")
    clip = work / f"demo-{args.seconds:g}s.wav"
    sf.write(clip, demo_clip(args.seconds, seed=args.seed), C.SAMPLE_RATE, subtype="PCM_16")
    print(f"2. generated a {args.seconds:g} s test clip (chirp, bell, noise bursts, voiced hum): {clip}")
    if args.reference:
        _demo_reference(model_dir, clip, args)
        return 0
    _demo_bundle(model_dir, bundle_dir)
    t = time.perf_counter()
    with AudioLM(bundle_dir, encoder="int8", decoder="Q4_K_M") as lm:
        load_s = time.perf_counter() - t
        print(f"4. loaded the runtime in {load_s:.1f} s; captioning {clip.name}:")
        res = lm.generate(clip, args.prompt, GenerationOptions(max_new_tokens=args.max_new_tokens))
    print(f"   text: {res.text!r}")
    print(f"   token ids: {list(res.token_ids[:16])}{' ...' if len(res.token_ids) > 16 else ''}")
    _print_stages(res)
    return 0


def _demo_bundle(model_dir: Path, bundle_dir: Path) -> None:
    from .convert.bundle import export_bundle

    from .. import export as export_pkg
    from .. import quantize as quantize_pkg
    from .code_key import code_key

    # a bundle made by another version of the exporters is made again
    key = code_key(f for pkg in (export_pkg, quantize_pkg) for f in Path(pkg.__file__).parent.rglob("*.py"))
    key_file = bundle_dir / ".exporter-key"
    if (bundle_dir / "manifest.json").is_file() and key_file.is_file() and key_file.read_text() == key:
        print(f"3. reusing bundle {bundle_dir}")
        return
    t = time.perf_counter()
    print("3. exporting the bundle (ONNX encoder fp32 + int8, GGUF decoder f16 + Q4_K_M):")
    export_bundle(model_dir, bundle_dir, encoders=["fp32", "int8"], decoders=["f16", "Q4_K_M"], progress=print)
    key_file.write_text(key)
    print(f"   bundle {bundle_dir} in {time.perf_counter() - t:.1f} s")


def _demo_reference(model_dir: Path, clip: Path, args: argparse.Namespace, prompts: Sequence[str] | None = None) -> None:
    from .reference.model import MiDashengLM
    from ..runtime import constants as C
    from ..runtime.audio import load_audio

    t = time.perf_counter()
    model = MiDashengLM.from_pretrained(model_dir, device=args.device)
    load_s = time.perf_counter() - t
    print(f"3. loaded the reference model on {args.device} in {load_s:.1f} s:")
    t = time.perf_counter()
    wave = load_audio(clip)
    dec_s = time.perf_counter() - t
    for prompt in prompts or [args.prompt]:
        result = model.generate(wave, prompt, max_new_tokens=args.max_new_tokens)
        _print_result(f"{clip.name} [{prompt}]", result, load_s, dec_s, wave.size / C.SAMPLE_RATE)


def _print_stages(res) -> None:
    print(f"   {res.audio_seconds:.2f} s audio -> {res.n_audio_tokens} audio tokens; {len(res.token_ids)} new tokens "
          f"({res.stop_reason}), {res.tokens_per_second:.1f} tok/s")
    print("   timings: " + ", ".join(f"{k.replace('_', ' ')} {v * 1000:.0f} ms" for k, v in res.timings.items()))


def _demo_toy(args: argparse.Namespace) -> int:
    """The default demo: the toy model trained here (cached) hears a clip it never trained on."""
    import soundfile as sf

    from .toy import world as toyworld
    from .toy.store import toy_model
    from .toy.train import TrainPlan
    from ..runtime import constants as C
    from ..runtime.options import GenerationOptions
    from ..runtime.pipeline import AudioLM
    from ..runtime.prompt import CAPTION_PROMPT, TRANSCRIBE_PROMPT

    work = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "mdl-edge-demo"
    path = "PyTorch reference" if args.reference else "runtime (int8 ONNX encoder + Q4_K_M llama.cpp decoder)"
    print(f"== mdl-edge demo: {path} on the toy MiDashengLM trained here ==")
    t = time.perf_counter()
    plan = TrainPlan(seed=args.seed)
    model_dir = toy_model(plan, progress=lambda m: print(f"   {m}", flush=True))
    print(f"1. toy model (trained on generated speech and sounds; official layout): {model_dir} ({time.perf_counter() - t:.1f} s)")
    clip_info = next(c for c in toyworld.clips("held-out", 50, seed=args.seed + 1) if c.transcript and len(c.events) >= 2)
    work.mkdir(parents=True, exist_ok=True)
    clip = work / "demo-held-out.wav"
    sf.write(clip, clip_info.wave, C.SAMPLE_RATE, subtype="PCM_16")
    print(f"2. generated a {clip_info.wave.size / C.SAMPLE_RATE:.2f} s held-out clip (a voice, speed and word order never trained on): {clip}")
    print(f"   what it holds:  caption {clip_info.caption!r}, transcript {clip_info.transcript!r}")
    if args.reference:
        _demo_reference(model_dir, clip, args, prompts=[CAPTION_PROMPT, TRANSCRIBE_PROMPT])
        return 0
    # named by the recipe, not the folder: the shipped weights keep their folder across recipes
    bundle_dir = work / f"bundle-toy-{plan.key()}"
    _demo_bundle(model_dir, bundle_dir)
    t = time.perf_counter()
    with AudioLM(bundle_dir, encoder="int8", decoder="Q4_K_M") as lm:
        print(f"4. loaded the runtime in {time.perf_counter() - t:.2f} s")
        options = GenerationOptions(max_new_tokens=args.max_new_tokens)
        for task, prompt, want in (("caption", CAPTION_PROMPT, clip_info.caption), ("transcript", TRANSCRIBE_PROMPT, clip_info.transcript)):
            res = lm.generate(clip, prompt, options)
            mark = "matches" if res.text.strip() == want else "differs from"
            print(f"   {task}: {res.text!r}  ({mark} the generator's {want!r})")
            _print_stages(res)
        said = next(c for c in toyworld.clips("connected", 50, seed=args.seed + 1) if len(c.words) > len(c.transcript.split()))
        clip = work / "demo-connected.wav"
        sf.write(clip, said.wave, C.SAMPLE_RATE, subtype="PCM_16")
        res = lm.generate(clip, TRANSCRIBE_PROMPT, options)
        mark = "matches" if res.text.strip() == said.transcript else "differs from"
        print(f"5. connected speech, an accent and a speed never trained on, with words outside the vocabulary: {clip}")
        print(f"   said {' '.join(w for w, _, _ in said.words)!r}; transcript {res.text!r}  ({mark} the vocabulary words said, "
              f"{said.transcript!r})")
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the export-side commands to ``mdl-edge``'s sub-command parser (the
    ``mdl_edge.commands`` entry point)."""
    s = sub.add_parser("synth", help="write a synthetic checkpoint (random weights, official layout)")
    s.add_argument("--preset", required=True, help="tiny | tiny-qwen2 | tiny-tok | toy | 0.6b | 0.6b-dasheng-1280 | 7b")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=_cmd_synth)

    tt = sub.add_parser("train-toy", help="train the toy model on generated speech and sounds (minutes; cached)")
    tt.add_argument("--out", help="write the checkpoint here (default: the cache, reused when present)")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--evaluate", type=int, default=0, metavar="N", help="then score the reference on N held-out and N connected-speech clips")
    tt.add_argument("--ship", action="store_true", help="then record the checkpoint as the weights shipped with the package (export/toy/trained/)")
    tt.set_defaults(func=_cmd_train_toy)

    e = sub.add_parser("export", help="turn a checkpoint into a runtime bundle (ONNX encoder + GGUF decoder)")
    e.add_argument("model", help="checkpoint folder in the official Hugging Face layout, or a folder with the official GGUF pair (text GGUF + mmproj)")
    e.add_argument("out", help="bundle folder to write")
    e.add_argument("--encoder", default="fp32,int8", help="encoder variants: fp32, int8, int8-static (default: %(default)s; the last is the default at load)")
    e.add_argument("--decoder", default="f16,Q4_K_M",
                   help="decoder variants: f32, f16, bf16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M (default: %(default)s)")
    e.set_defaults(func=_cmd_export)

    pr = sub.add_parser("parity", help="compare the PyTorch reference with every variant of a bundle")
    pr.add_argument("model", help="the checkpoint folder (official layout)")
    pr.add_argument("--bundle", help="bundle exported from it (default: export one to a temp folder)")
    pr.add_argument("--device", default="cpu", help="where the reference runs: cpu or cuda")
    pr.add_argument("--audio", nargs="+", help="clips to compare on (default: generated 3, 12 and 25 s clips)")
    pr.add_argument("--max-new-tokens", type=int, default=32)
    pr.add_argument("--threads", type=int)
    pr.add_argument("--task-clips", type=int, help="score captions and transcripts on this many held-out toy-world clips "
                    "(default: 100 for the toy model trained by train-toy, else 0)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=_cmd_parity)

    b = sub.add_parser("bench", help="end-to-end benchmark: the PyTorch reference vs runtime bundles")
    b.add_argument("--model", help="checkpoint folder (default: synthesize --preset into --work)")
    b.add_argument("--bundle", help="bundle with fp32/int8 encoders and f16/Q4_K_M decoders (default: export into --work)")
    b.add_argument("--preset", default="0.6b")
    b.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mdl-edge-bench"))
    b.add_argument("--clips", default=None, help="clip lengths in seconds (default: 1,2,3,5,10,30,60,300; 7b: 1,3,5,10,30)")
    b.add_argument("--no-reference", action="store_true", help="time the runtime only (always so for --preset 7b)")
    b.add_argument("--no-legacy", action="store_true", help="leave out the legacy configuration (partial chunks padded to 1008 frames, the prompt in three calls, flash attention off)")
    b.add_argument("--parallel", nargs="?", const="1,2,4,8", metavar="N,N,...",
                   help="instead: aggregate decode rate and files/s at these numbers of sequences decoded together (default 1,2,4,8; "
                        "clips default 5,30; decoders Q4_K_M and f16, or those of --variants)")
    b.add_argument("--parallel-tokens", default="32,128", help="new tokens per file in the --parallel table (default: %(default)s)")
    b.add_argument("--extra-bufts", action=argparse.BooleanOptionalAction, default=None,
                   help="--parallel with or without llama.cpp's repacked weights (default: as the runtime chooses; refused on builds with AMX)")
    b.add_argument("--tokens", type=int, default=32, help="new tokens per caption (stop tokens ignored)")
    b.add_argument("--repeats", type=int, default=1,
                   help="run each clip this many times in a row and report the median of its times (default: %(default)s)")
    b.add_argument("--variants", default=None, help="runtime ENCODER+DECODER pairs to time (default: fp32+f16,int8+Q4_K_M)")
    b.add_argument("--threads", type=int)
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(func=_cmd_bench)

    r = sub.add_parser("reference", help="the full-precision PyTorch reference")
    rsub = r.add_subparsers(dest="ref_command", required=True, metavar="ACTION")
    rc = rsub.add_parser("caption", help="caption audio files with the reference model")
    rc.add_argument("audio", nargs="+", help="audio files")
    rc.add_argument("--model", required=True, help="checkpoint folder in the official Hugging Face layout")
    rc.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    rc.add_argument("--prompt", default="Caption the audio.", help="question or instruction (default: %(default)r)")
    rc.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    rc.add_argument("--bf16-buffers", action="store_true", help="round window/filterbank to bf16 like bf16 deployments")
    rc.set_defaults(func=_cmd_reference_caption)

    d = sub.add_parser("demo", help="caption and transcribe a generated clip end to end with the built-in toy model")
    d.add_argument("--preset", default="toy", help="toy (trained here, cached; default) or a random-weight preset: tiny, tiny-qwen2, tiny-tok, 0.6b, 0.6b-dasheng-1280, 7b")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--seconds", type=float, default=10.0)
    d.add_argument("--device", default="cpu", help="with --reference: cpu or cuda")
    d.add_argument("--reference", action="store_true", help="run the PyTorch reference instead of the runtime")
    d.add_argument("--prompt", default="Caption the audio.", help="the prompt of random-weight presets (toy: caption and transcribe)")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--workdir", default=os.environ.get("MDL_EDGE_WORKDIR"), help="where the model and clip go (default: a temp folder)")
    d.set_defaults(func=_cmd_demo)
