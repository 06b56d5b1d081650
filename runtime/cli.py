"""The ``mdl-edge`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import ConfigError, MdlEdgeError, OptionError
from .options import DEFAULT_MAX_NEW_TOKENS, DecoderOptions, EncoderOptions, default_parallel

if TYPE_CHECKING:
    from .pipeline import AudioLM

EXPORT_HINT = "this command needs the export extra (PyTorch, transformers): pip install 'mdl-edge[export]'"


def _need_export() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MdlEdgeError(f"{EXPORT_HINT} ({e})") from e


def _cmd_synth(args: argparse.Namespace) -> int:
    _need_export()
    from ..export.synth import PRESETS, write_synthetic_checkpoint

    t = time.perf_counter()
    out = write_synthetic_checkpoint(args.preset, args.out, seed=args.seed, overwrite=args.force)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote synthetic '{args.preset}' checkpoint ({PRESETS[args.preset].description}) to {out}")
    print(f"{size / 2**20:.1f} MiB in {time.perf_counter() - t:.1f} s; random weights: its output text is meaningless")
    return 0


def _cmd_train_toy(args: argparse.Namespace) -> int:
    _need_export()
    from ..export.toy_train import TrainPlan, cached_toy_model, default_cache, toy_model, train_toy

    plan = TrainPlan(seed=args.seed)
    trains = bool(args.out) or not cached_toy_model(plan)[1]
    if trains:
        # The training time is only comparable across hosts (and across hours on a shared host)
        # beside the rate the host gives now: measured before and after.
        from ..export.machine import gemm_rate

        before = gemm_rate(False, plan.threads)
    if args.out:
        out = train_toy(args.out, plan)
    else:
        out = toy_model(plan)
        print(f"toy model (cached in {default_cache()}): {out}")
    if trains:
        print(f"this host's fp32 GEMM rate ({plan.threads} threads): {before:.0f} GFLOP/s before training, "
              f"{gemm_rate(False, plan.threads):.0f} after")
    if args.evaluate:
        from ..export import toyworld
        from ..export.reference_model import MiDashengLM

        model = MiDashengLM.from_pretrained(out)
        clips = list(toyworld.clips("held-out", args.evaluate, seed=12345))
        m = toyworld.evaluate(lambda w, p: model.generate(w, p, max_new_tokens=48).text, clips)
        print(f"held-out ({m['clips']} clips, {m['speech_clips']} with speech), PyTorch reference: word accuracy "
              f"{m['word_accuracy']:.3f}, caption exact {m['caption_exact']:.3f}, caption elements {m['caption_elements']:.3f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _need_export()
    from ..export.bundle import export_bundle

    t = time.perf_counter()
    print(f"exporting {args.model} -> bundle {args.out}")
    export_bundle(args.model, args.out, encoders=_variants(args.encoder), decoders=_variants(args.decoder))
    print(f"done in {time.perf_counter() - t:.1f} s")
    return 0


def _variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _run_task(args: argparse.Namespace, task: str) -> int:
    import json

    from .audio import expected_samples
    from .options import GenerationOptions, SamplingOptions, whole_number
    from .pipeline import Request, Result
    from .segments import SegmentOptions
    from .progress import Progress
    from .prompt import CAPTION_PROMPT, question_prompt, transcribe_prompt

    # Options and the prompt are built (and validated) once, before the model is loaded.
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=SamplingOptions(temperature=args.temperature, seed=args.seed))
    prompt = {"caption": lambda: CAPTION_PROMPT, "transcribe": lambda: transcribe_prompt(args.language),
              "ask": lambda: question_prompt(args.question)}[task]()
    streaming = args.stream and not args.json
    whole_number("parallel", args.parallel)
    from .cluster import expand_inputs  # torch- and ray-free: files, globs, list files

    args.audio = expand_inputs(args.audio)
    if args.engine == "ray":
        return _run_ray(args, task, prompt, options)
    if task != "ask":
        segmenting = SegmentOptions(mode=args.segment, max_segment=args.max_segment, window=args.window)
        mode = segmenting.resolved(task)
        long_input = any(segmenting.cuts(mode, expected_samples(p)) for p in args.audio)
        if args.format or args.output or long_input:
            return _run_segments(args, task, prompt, options, segmenting, mode)
    # streamed text of several files at once would interleave: one at a time then
    parallel = 1 if streaming else min(args.parallel, len(args.audio))
    failed: list[str] = []
    # progress on stderr: files done, and encoder chunks of long clips; never when streaming text
    bar = Progress(len(args.audio), "files", enabled=not args.no_progress and not streaming)

    def report(path: str, res: Result | MdlEdgeError) -> None:
        if isinstance(res, MdlEdgeError):
            failed.append(path)
            if args.json:
                print(json.dumps({"file": path, "error": str(res)}, ensure_ascii=False), flush=True)
            elif streaming:
                print()
            print(f"mdl-edge: error: {res}", file=sys.stderr)
        elif args.json:
            print(json.dumps({
                "file": path, "text": res.text, "token_ids": list(res.token_ids), "n_audio_tokens": res.n_audio_tokens,
                "audio_seconds": res.audio_seconds, "stop_reason": res.stop_reason, "timings": res.timings,
                "tokens_per_second": res.tokens_per_second,
            }, ensure_ascii=False), flush=True)
        elif streaming:
            print()
        else:
            print(f"{path}: {res.text}", flush=True)

    with _audio_lm(args, parallel) as lm:
        if parallel == 1:
            for n_done, path in enumerate(args.audio):
                bar.update(n_done, Path(path).name)
                if streaming:
                    print(f"{path}: ", end="", flush=True)
                try:
                    res: Result | MdlEdgeError = lm.generate(
                        path, prompt, options, on_text=(lambda piece: print(piece, end="", flush=True)) if streaming else None,
                        on_chunks=lambda k, total, name=Path(path).name: bar.update(n_done, f"{name}: chunk {k}/{total}"))
                except MdlEdgeError as e:
                    res = e
                bar.close()
                report(path, res)
        else:
            # JSON lines as each file finishes (each names its file); text in input order
            pending: dict[int, Result | MdlEdgeError] = {}
            next_out = 0
            requests = (Request(audio=p, prompt=prompt, options=options, tag=i) for i, p in enumerate(args.audio))
            for n_done, (req, res) in enumerate(lm.run(requests, parallel=parallel), start=1):
                bar.update(n_done, Path(args.audio[req.tag]).name)
                if args.json:
                    bar.close()
                    report(args.audio[req.tag], res)
                    continue
                pending[req.tag] = res
                while next_out in pending:
                    bar.close()
                    report(args.audio[next_out], pending.pop(next_out))
                    next_out += 1
            bar.close()
    if failed:
        print(f"mdl-edge: {len(failed)} of {len(args.audio)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_ray(args: argparse.Namespace, task: str, prompt: str, options: object) -> int:
    """``--engine ray``: the inputs as a Ray Data job, rows appended to ``--out``."""
    try:
        from .cluster import ClusterOptions, answer_files
    except ImportError as e:
        raise MdlEdgeError(f"--engine ray needs the cluster extra (pip install 'mdl-edge[cluster]'): {e}") from e
    from .segments import SegmentOptions

    if not args.out:
        raise OptionError("out", "--engine ray writes its rows to a file: give --out RESULTS.jsonl (or .parquet)")
    cluster = ClusterOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker, address=args.ray_address,
                             batch_size=args.batch_size, parallel=args.parallel, retries=args.retries, retry_errors=args.retry_errors)
    segmenting = SegmentOptions(mode=args.segment, max_segment=args.max_segment, window=args.window) if task != "ask" \
        else SegmentOptions(mode="none")
    encoder, decoder = _load_options(args, args.parallel)
    summary = answer_files(args.audio, args.model, out=args.out, prompt=prompt, task=task, options=options, segmenting=segmenting,  # type: ignore[arg-type]
                           cluster=cluster, encoder=encoder, decoder=decoder,
                           on_row=None if args.no_progress else lambda r: print(f"{r['file']}: {r.get('error') or r['text']}", file=sys.stderr))
    print(f"mdl-edge: {summary.inputs} input(s): {summary.skipped} already in {summary.out}, {summary.answered} answered, "
          f"{summary.failed} failed ({summary.files_per_second:.2f} files/s over {summary.seconds:.1f} s)", file=sys.stderr)
    return 1 if summary.failed else 0


def _load_options(args: argparse.Namespace, parallel: int) -> tuple[EncoderOptions, DecoderOptions]:
    """The load-time options of a runtime command, built (and validated) once from its arguments;
    a command without an option's flag gets the option's own default."""
    enc, dec = EncoderOptions(), DecoderOptions()
    encoder = EncoderOptions(variant=args.encoder, provider=getattr(args, "provider", enc.provider),
                             max_batch=getattr(args, "max_batch", enc.max_batch))
    decoder = DecoderOptions(variant=args.decoder, n_ctx=getattr(args, "n_ctx", dec.n_ctx), n_batch=getattr(args, "n_batch", dec.n_batch),
                             flash_attn=getattr(args, "flash_attn", dec.flash_attn), extra_bufts=_extra_bufts(args, parallel))
    return encoder, decoder


def _audio_lm(args: argparse.Namespace, parallel: int) -> AudioLM:
    """The one place a runtime command builds its :class:`AudioLM`."""
    from .pipeline import AudioLM

    encoder, decoder = _load_options(args, parallel)
    return AudioLM(args.model, threads=args.threads, encoder=encoder, decoder=decoder)


def _extra_bufts(args: argparse.Namespace, parallel: int) -> bool:
    """``--[no-]extra-bufts``, or by default: on when several sequences decode together and this
    llama.cpp build can repack safely (no AMX). Measured on a 2-core AVX-512 Xeon with a build
    without AMX (README, "Many files at once"): repacked Q4_K_M decodes 1.25x faster alone and
    1.42x at 4 sequences, for +0.21 GB; single runs keep the smaller footprint."""
    if args.extra_bufts is not None:
        return bool(args.extra_bufts)
    if parallel <= 1:
        return False
    from .decoder import extra_bufts_safe

    return extra_bufts_safe()


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import ServerOptions, serve
    except ImportError as e:
        raise MdlEdgeError(f"`mdl-edge serve` needs the server extra (pip install 'mdl-edge[server]'): {e}") from e
    from .segments import SegmentOptions

    if not args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    options = ServerOptions(host=args.host, port=args.port, api_key=args.api_key, parallel=args.parallel, max_queue=args.max_queue,
                            max_upload_mb=args.max_upload_mb, max_audio_s=args.max_audio_s, model_id=args.model_id,
                            segmenting=SegmentOptions(max_segment=args.max_segment), n_ctx=args.n_ctx)
    encoder, decoder = _load_options(args, args.parallel)
    serve(args.model, options, threads=args.threads, encoder=encoder, decoder=decoder)
    return 0


def _run_segments(args: argparse.Namespace, task: str, prompt: str, options: object, segmenting: object, mode: str) -> int:
    """Recordings as timed segments (long files, or any file with --format / -o): each file's
    segments are written as they are answered, to stdout or to -o (a file, or a folder that gets
    one output per input)."""
    from . import constants as C
    from .audio import expected_samples
    from .progress import Progress
    from .writers import SegmentWriter

    fmt = args.format or ("jsonl" if args.json else "txt")
    out = Path(args.output) if args.output else None
    many = len(args.audio) > 1
    if out is not None and many and not out.is_dir():
        raise OptionError("output", f"{out} must be an existing folder when several files are given (one output per input)")
    failed: list[str] = []
    with _audio_lm(args, args.parallel) as lm:
        for path in args.audio:
            target = out / f"{Path(path).stem}.{fmt}" if out is not None and out.is_dir() else out
            stream = open(target, "w", encoding="utf-8") if target is not None else sys.stdout
            if target is None and many and fmt == "txt":
                print(f"==> {path} <==", flush=True)
            writer = SegmentWriter(stream, fmt, source=str(path))
            n = expected_samples(path)
            seg_s = segmenting.segment_seconds(mode)  # type: ignore[attr-defined]
            bar = Progress(max(1, -(-n // int(seg_s * C.SAMPLE_RATE))) if n else 1, "segments", enabled=not args.no_progress)
            error = None
            try:
                for seg in lm.segments(path, prompt, options, mode=mode, segmenting=segmenting, parallel=args.parallel,  # type: ignore[arg-type]
                                       on_segment=lambda k, name=Path(path).name: bar.update(k, name)):
                    bar.close()
                    writer.write(seg)
            except MdlEdgeError as e:
                error = str(e)
                failed.append(path)
                print(f"mdl-edge: error: {e}", file=sys.stderr)
            finally:
                bar.close()
                writer.close(error)
                if target is not None:
                    stream.close()
                    print(f"{path} -> {target}", file=sys.stderr)
    if failed:
        print(f"mdl-edge: {len(failed)} of {len(args.audio)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    _need_export()
    import json

    from ..export.parity import format_report, parity_report

    bundle = args.bundle
    if bundle is None:
        from ..export.bundle import export_bundle

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

    from ..export.bench import DEFAULT_CLIPS, format_bench, run_bench
    from ..export.bundle import export_bundle
    from ..export.synth import write_synthetic_checkpoint
    from . import constants as C
    from .audio import demo_clip

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
    from ..export.machine import measure
    from .options import resolve_threads

    if args.parallel:
        from ..export.bench import format_parallel, run_parallel_bench

        peaks = measure(resolve_threads(args.threads))
        decoders = tuple(v.split("+")[1] for v in args.variants.split(",")) if args.variants_given else ("Q4_K_M", "f16")
        seqs = tuple(int(x) for x in args.parallel.split(","))
        results = run_parallel_bench(bundle, clips, decoders=decoders, parallel=seqs, tokens=tuple(int(x) for x in args.parallel_tokens.split(",")),
                                     threads=args.threads, extra_bufts=args.extra_bufts)
        print(format_parallel(results, bundle=bundle, peaks=peaks))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    reference = not args.no_reference and args.preset != "7b"
    if not reference:
        print("runtime only: " + ("--no-reference" if args.no_reference else "the 7B PyTorch reference needs more memory than this benchmark assumes"),
              file=sys.stderr)
    peaks = measure(resolve_threads(args.threads))
    results = run_bench(model, bundle, clips, tokens=args.tokens, threads=args.threads, variants=pairs,  # type: ignore[arg-type]
                        reference=reference, legacy=not args.no_legacy)
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
    from ..export.reference_model import MiDashengLM
    from . import constants as C
    from .audio import load_audio

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

    from ..export.synth import write_synthetic_checkpoint
    from . import constants as C
    from .audio import demo_clip
    from .options import GenerationOptions
    from .pipeline import AudioLM

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
    from ..export.bundle import export_bundle

    import hashlib

    from .. import export as export_pkg
    from .. import quantize as quantize_pkg

    # a bundle made by another version of the exporters is made again
    h = hashlib.sha256()
    for pkg in (export_pkg, quantize_pkg):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(f.read_bytes())
    key_file = bundle_dir / ".exporter-key"
    if (bundle_dir / "manifest.json").is_file() and key_file.is_file() and key_file.read_text() == h.hexdigest():
        print(f"3. reusing bundle {bundle_dir}")
        return
    t = time.perf_counter()
    print("3. exporting the bundle (ONNX encoder fp32 + int8, GGUF decoder f16 + Q4_K_M):")
    export_bundle(model_dir, bundle_dir, encoders=["fp32", "int8"], decoders=["f16", "Q4_K_M"], progress=print)
    key_file.write_text(h.hexdigest())
    print(f"   bundle {bundle_dir} in {time.perf_counter() - t:.1f} s")


def _demo_reference(model_dir: Path, clip: Path, args: argparse.Namespace, prompts: Sequence[str] | None = None) -> None:
    from ..export.reference_model import MiDashengLM
    from . import constants as C
    from .audio import load_audio

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

    from ..export import toyworld
    from ..export.toy_train import TrainPlan, toy_model
    from . import constants as C
    from .options import GenerationOptions
    from .pipeline import AudioLM
    from .prompt import CAPTION_PROMPT, TRANSCRIBE_PROMPT

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
    bundle_dir = work / f"bundle-toy-{model_dir.name}"
    _demo_bundle(model_dir, bundle_dir)
    t = time.perf_counter()
    with AudioLM(bundle_dir, encoder="int8", decoder="Q4_K_M") as lm:
        print(f"4. loaded the runtime in {time.perf_counter() - t:.1f} s")
        options = GenerationOptions(max_new_tokens=args.max_new_tokens)
        for task, prompt, want in (("caption", CAPTION_PROMPT, clip_info.caption), ("transcript", TRANSCRIBE_PROMPT, clip_info.transcript)):
            res = lm.generate(clip, prompt, options)
            mark = "matches" if res.text.strip() == want else "differs from"
            print(f"   {task}: {res.text!r}  ({mark} the generator's {want!r})")
            _print_stages(res)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mdl-edge`` (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="mdl-edge",
        description="Run MiDashengLM (audio captioning, ASR, audio QA) on a CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  mdl-edge demo                                     # everything on a synthetic model\n"
            "  mdl-edge export midashenglm-7b bundle             # a downloaded checkpoint -> runtime bundle\n"
            "  mdl-edge caption a.wav b.m4a --model bundle --json\n"
            "  mdl-edge transcribe talk.flac --language en --model bundle --stream\n"
            "  mdl-edge ask a.wav -q 'What sound is heard?' --model bundle\n"
            "  mdl-edge parity midashenglm-7b --bundle bundle    # what each quantized variant costs\n"
            "  mdl-edge serve --model bundle                     # OpenAI's audio API on http://127.0.0.1:8080\n"
        ),
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic checkpoint (random weights, official layout)")
    s.add_argument("--preset", required=True, help="tiny | tiny-qwen2 | tiny-tok | toy | 0.6b | 0.6b-dasheng-1280 | 7b")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=_cmd_synth)

    tt = sub.add_parser("train-toy", help="train the toy model on generated speech and sounds (minutes; cached)")
    tt.add_argument("--out", help="write the checkpoint here (default: the cache, reused when present)")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--evaluate", type=int, default=0, metavar="N", help="then score the reference on N held-out clips")
    tt.set_defaults(func=_cmd_train_toy)

    e = sub.add_parser("export", help="turn a checkpoint into a runtime bundle (ONNX encoder + GGUF decoder)")
    e.add_argument("model", help="checkpoint folder in the official Hugging Face layout, or a folder with the official GGUF pair (text GGUF + mmproj)")
    e.add_argument("out", help="bundle folder to write")
    e.add_argument("--encoder", default="fp32,int8", help="encoder variants: fp32, int8, int8-static (default: %(default)s; the last is the default at load)")
    e.add_argument("--decoder", default="f16,Q4_K_M",
                   help="decoder variants: f32, f16, bf16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M (default: %(default)s)")
    e.set_defaults(func=_cmd_export)

    for task, helptext in (("caption", "caption audio files"), ("transcribe", "transcribe speech in audio files"), ("ask", "ask a question about an audio file")):
        t = sub.add_parser(task, help=helptext)
        t.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3; more with ffmpeg)")
        t.add_argument("--model", required=True, help="bundle folder made by `mdl-edge export`")
        if task == "ask":
            t.add_argument("-q", "--question", required=True)
        if task == "transcribe":
            t.add_argument("--language", help="language tag, e.g. en, zh (adds <|en|> to the prompt)")
        t.add_argument("--encoder", help="encoder variant (default: the bundle's)")
        t.add_argument("--decoder", help="decoder variant (default: the bundle's)")
        t.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="new-token limit (default: %(default)s)")
        t.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        t.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
        t.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
        t.add_argument("--stream", action="store_true", help="print tokens as they are generated")
        if task != "ask":
            seg = t.add_argument_group("long recordings (files longer than a segment are cut and answered segment by segment)")
            seg.add_argument("--segment", default="auto", choices=("auto", "vad", "window", "none"),
                             help="auto (default): files longer than one segment are cut, at pauses to transcribe (vad), in fixed "
                                  "windows to caption; vad / window: every file; none: the whole file at once")
            seg.add_argument("--max-segment", type=float, default=30.0, metavar="S", help="longest vad segment in seconds (default: %(default)s)")
            seg.add_argument("--window", type=float, default=10.0, metavar="S", help="caption window in seconds (default: %(default)s)")
            seg.add_argument("--format", choices=("txt", "json", "jsonl", "srt", "vtt"),
                             help="timed segments in this format (default for long files: txt; jsonl with --json)")
            seg.add_argument("-o", "--output", help="write there: a file, or for several inputs an existing folder (one output per input)")
        t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (it is off anyway when stderr is not a terminal)")
        cl = t.add_argument_group("many machines (needs the `cluster` extra): inputs may also be globs and list files (.txt, one path a line)")
        cl.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local (default): this process; ray: a pool of Ray actors, rows appended to --out as they come")
        cl.add_argument("--out", help="with --engine ray: results as JSON Lines (or .parquet); a rerun with the same --out answers only what is missing")
        cl.add_argument("--workers", type=int, default=1, help="with --engine ray: actors, each loading the bundle once (default: %(default)s)")
        cl.add_argument("--cpus-per-worker", type=int, help="with --engine ray: CPUs (threads) per actor (default: a local instance's cores shared out)")
        cl.add_argument("--ray-address", help="with --engine ray: a running cluster (auto, ray://HOST:10001; default: start a local instance)")
        cl.add_argument("--batch-size", type=int, default=8, help="with --engine ray: files per actor call (default: %(default)s)")
        cl.add_argument("--retries", type=int, default=3, help="with --engine ray: tries again of a batch whose actor died (default: %(default)s)")
        cl.add_argument("--retry-errors", action="store_true", help="with --engine ray: a rerun also retries files whose row is an error")
        perf = t.add_argument_group("performance")
        perf.add_argument("--parallel", type=int, default=default_parallel(), metavar="N",
                          help="files (or segments) decoded together in one llama.cpp context (default here: %(default)s: twice "
                               "the cores, at most 8, at most 2 under 8 GB of memory; 1 with --stream)")
        perf.add_argument("--threads", type=int, help="CPU threads (default: all available)")
        perf.add_argument("--n-ctx", type=int, help="decoder context in positions (default: sized to each request)")
        perf.add_argument("--n-batch", type=int, default=DecoderOptions().n_batch, help="prompt positions per llama.cpp batch (default: %(default)s)")
        perf.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=None,
                          help="llama.cpp flash attention (default: on; faster prompts, logits differ by round-off)")
        perf.add_argument("--extra-bufts", action=argparse.BooleanOptionalAction, default=None,
                          help="let llama.cpp repack weights for this CPU (faster decoding, +0.2 GB; default: on when several "
                               "sequences decode together and the build has no AMX)")
        perf.add_argument("--provider", default=EncoderOptions().provider, help="encoder execution provider: cpu or cuda (default: %(default)s)")
        perf.add_argument("--max-batch", type=int, help="encoder chunks per ONNX run (default: 1 on cpu, 8 on cuda)")
        t.set_defaults(func=lambda a, task=task: _run_task(a, task), parser=t)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the `server` extra)",
                        description="Serve a bundle through OpenAI's audio API: POST /v1/audio/transcriptions, POST "
                                    "/v1/chat/completions (input_audio parts), GET /v1/models, /health, /metrics, and a page at /.")
    sv.add_argument("--model", required=True, help="bundle folder made by `mdl-edge export`")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    sv.add_argument("--api-key", default=os.environ.get("MDL_EDGE_API_KEY"),
                    help="require Authorization: Bearer KEY on /v1 and /metrics (default: $MDL_EDGE_API_KEY, else none)")
    sv.add_argument("--parallel", type=int, default=default_parallel(), metavar="N",
                    help="requests decoded together (default here: %(default)s)")
    sv.add_argument("--max-queue", type=int, default=16, metavar="N", help="admitted requests waiting beyond those; more get 503 (default: %(default)s)")
    sv.add_argument("--max-upload-mb", type=float, default=25.0, help="largest upload; more gets 413 (default: %(default)s)")
    sv.add_argument("--max-audio-s", type=float, default=3600.0, help="longest recording; more gets 413 (default: %(default)s)")
    sv.add_argument("--max-segment", type=float, default=30.0, metavar="S",
                    help="longer transcriptions are cut at pauses into segments of at most S seconds (default: %(default)s)")
    sv.add_argument("--n-ctx", type=int, help="decoder positions shared by the requests decoding together, allocated at start "
                    "(default: 2048 per --parallel)")
    sv.add_argument("--model-id", help="the model's name in /v1/models (default: the bundle folder's name)")
    sv.add_argument("--encoder", help="encoder variant (default: the bundle's)")
    sv.add_argument("--decoder", help="decoder variant (default: the bundle's)")
    sv.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    sv.add_argument("--extra-bufts", action=argparse.BooleanOptionalAction, default=None,
                    help="let llama.cpp repack weights for this CPU (default: on when --parallel > 1 and the build has no AMX)")
    sv.set_defaults(func=_cmd_serve, parser=sv)

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
    b.add_argument("--no-legacy", action="store_true", help="leave out the configuration that runs as before issue #12")
    b.add_argument("--parallel", nargs="?", const="1,2,4,8", metavar="N,N,...",
                   help="instead: aggregate decode rate and files/s at these numbers of sequences decoded together (default 1,2,4,8; "
                        "clips default 5,30; decoders Q4_K_M and f16, or those of --variants)")
    b.add_argument("--parallel-tokens", default="32,128", help="new tokens per file in the --parallel table (default: %(default)s)")
    b.add_argument("--extra-bufts", action="store_true", help="--parallel with llama.cpp's repacked weights (refused on builds with AMX)")
    b.add_argument("--tokens", type=int, default=32, help="new tokens per caption (stop tokens ignored)")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mdl-edge`` console script."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(name)s: %(message)s")
    # Exit codes: 2 for a command line that asks for something impossible (as argparse's own
    # usage errors), 1 for files that are missing, corrupt or do not belong together.
    try:
        return args.func(args)
    except OptionError as e:
        parser: argparse.ArgumentParser | None = getattr(args, "parser", None)
        flag = "--" + e.option.replace("_", "-")
        if parser is not None and flag in parser._option_string_actions:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: argument {flag}: {e.detail}", file=sys.stderr)
        else:
            print(f"mdl-edge: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"mdl-edge: error: {e}", file=sys.stderr)
        return 2
    except MdlEdgeError as e:
        print(f"mdl-edge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
