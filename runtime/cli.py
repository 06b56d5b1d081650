"""The ``mdl-edge`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .errors import MdlEdgeError

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


def _cmd_export(args: argparse.Namespace) -> int:
    _need_export()
    from ..export.onnx_encoder import export_audio_onnx
    from ..quantize.encoder import VARIANTS, quantize_encoder

    variants = [v for v in args.encoder.split(",") if v]
    unknown = [v for v in variants if v != "fp32" and v not in VARIANTS]
    if unknown:
        raise MdlEdgeError(f"unknown encoder variant(s) {', '.join(unknown)}; choose from fp32, {', '.join(VARIANTS)}")
    t = time.perf_counter()
    enc, proj = export_audio_onnx(args.model, args.out)
    print(f"exported {enc.name} and {proj.name} to {args.out} in {time.perf_counter() - t:.1f} s")
    for v in variants:
        if v == "fp32":
            continue
        t = time.perf_counter()
        path = quantize_encoder(args.out, v)
        print(f"quantized {path.name} in {time.perf_counter() - t:.1f} s")
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
    import soundfile as sf

    from ..export.reference_model import MiDashengLM
    from ..export.synth import write_synthetic_checkpoint
    from . import constants as C
    from .audio import demo_clip, load_audio

    work = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "mdl-edge-demo"
    model_dir = work / f"synth-{args.preset}-seed{args.seed}"
    print(f"== mdl-edge demo: full-precision PyTorch reference on a synthetic '{args.preset}' model ==")
    print("   (random weights: the pipeline is real, the caption text is meaningless)")
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        write_synthetic_checkpoint(args.preset, model_dir, seed=args.seed, overwrite=True)
        print(f"1. synthesized checkpoint {model_dir} in {time.perf_counter() - t:.1f} s")
    else:
        print(f"1. reusing synthesized checkpoint {model_dir}")
    clip = work / f"demo-{args.seconds:g}s.wav"
    sf.write(clip, demo_clip(args.seconds, seed=args.seed), C.SAMPLE_RATE, subtype="PCM_16")
    print(f"2. generated a {args.seconds:g} s test clip (chirp, bell, noise bursts, voiced hum): {clip}")
    t = time.perf_counter()
    model = MiDashengLM.from_pretrained(model_dir, device=args.device)
    load_s = time.perf_counter() - t
    print(f"3. loaded the reference model on {args.device} in {load_s:.1f} s; captioning:")
    t = time.perf_counter()
    wave = load_audio(clip)
    dec_s = time.perf_counter() - t
    result = model.generate(wave, args.prompt, max_new_tokens=args.max_new_tokens)
    _print_result(str(clip), result, load_s, dec_s, wave.size / C.SAMPLE_RATE)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mdl-edge`` (exposed for docs and tests)."""
    p = argparse.ArgumentParser(prog="mdl-edge", description="Run MiDashengLM (audio captioning, ASR, audio QA) on a CPU.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic checkpoint (random weights, official layout)")
    s.add_argument("--preset", required=True, help="tiny | tiny-qwen2 | 0.6b | 7b")
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=_cmd_synth)

    e = sub.add_parser("export", help="export a checkpoint's audio encoder and projector to ONNX (+ quantized variants)")
    e.add_argument("model", help="checkpoint folder in the official Hugging Face layout")
    e.add_argument("out", help="output folder")
    e.add_argument("--encoder", default="fp32,int8", help="encoder variants, comma-separated: fp32, int8, int8-static (default: %(default)s)")
    e.set_defaults(func=_cmd_export)

    r = sub.add_parser("reference", help="the full-precision PyTorch reference")
    rsub = r.add_subparsers(dest="ref_command", required=True, metavar="ACTION")
    rc = rsub.add_parser("caption", help="caption audio files with the reference model")
    rc.add_argument("audio", nargs="+", help="audio files")
    rc.add_argument("--model", required=True, help="checkpoint folder in the official Hugging Face layout")
    rc.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    rc.add_argument("--prompt", default="Caption the audio.", help="question or instruction (default: %(default)r)")
    rc.add_argument("--max-new-tokens", type=int, default=256)
    rc.add_argument("--bf16-buffers", action="store_true", help="round window/filterbank to bf16 like bf16 deployments")
    rc.set_defaults(func=_cmd_reference_caption)

    d = sub.add_parser("demo", help="synthesize a model and caption a generated clip end to end")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--seconds", type=float, default=10.0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--prompt", default="Caption the audio.")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--workdir", default=os.environ.get("MDL_EDGE_WORKDIR"), help="where the model and clip go (default: a temp folder)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mdl-edge`` console script."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except MdlEdgeError as e:
        print(f"mdl-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
