"""The ``mdl-edge`` command line: the runtime commands (caption, transcribe, ask, serve); the
export-side ones register themselves (``mdl_edge.commands`` entry points, see ``export/cli.py``)."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from .errors import ConfigError, MdlEdgeError, OptionError
from .options import DEFAULT_MAX_NEW_TOKENS, PREFILL_CHOICES, DecoderOptions, EncoderOptions, SamplingOptions, default_parallel

if TYPE_CHECKING:
    from .cluster import ClusterOptions
    from .audio import NamedBytes
    from .pipeline import AudioLM, Result
    from .progress import Progress
    from .segments import SegmentOptions, TimedSegment
    from .server import ServerOptions


def _run_task(args: argparse.Namespace, task: str) -> int:
    from .audio import expected_samples
    from .options import GenerationOptions, SamplingOptions, whole_number
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
    if args.engine == "ray" or args.out:
        if STDIN in args.audio:
            raise OptionError("out", f"{STDIN} (standard input) cannot be a job's input: a job's rows are kept by file name")
        return _run_job(args, task, prompt, options)
    args.stdin = _read_stdin(args.audio)
    if task != "ask":
        if args.skip_existing and not args.output:
            raise OptionError("skip_existing", "skips inputs whose output file is there already: give -o FOLDER (or --out for a job)")
        segmenting = _segmenting(args)
        mode = segmenting.resolved(task)
        sizes = [expected_samples(_source(args, p)) for p in args.audio]  # what each header announces, read once
        if args.format or args.output or any(segmenting.cuts(mode, n) for n in sizes):
            return _run_segments(args, task, prompt, options, segmenting, mode, sizes)
    # streamed text of several files at once would interleave: one at a time then
    parallel = 1 if streaming else min(args.parallel, len(args.audio))
    failed: list[str] = []
    # progress on stderr: files done, and encoder chunks of long clips; never when streaming text
    bar = Progress(len(args.audio), "files", enabled=not args.no_progress and not streaming)

    def report(path: str, res: Result | MdlEdgeError) -> None:
        _report(args, path, res, streaming, failed)

    with audio_lm(args, parallel) as lm:
        if parallel == 1:
            _answer_one_by_one(lm, args, prompt, options, streaming, bar, report)
        else:
            _answer_together(lm, args, prompt, options, parallel, bar, report)
    if failed:
        print(f"mdl-edge: {len(failed)} of {len(args.audio)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


#: The input name that stands for standard input (``ffmpeg ... -f wav - | mdl-edge transcribe -``).
STDIN = "-"


def _read_stdin(paths: list[str]) -> "NamedBytes | None":
    """What came on standard input, read once, where ``-`` is among the inputs."""
    from .audio import NamedBytes

    if STDIN not in paths:
        return None
    if paths.count(STDIN) > 1:
        raise OptionError("audio", f"{STDIN} (standard input) can be given once")
    if sys.stdin is None or sys.stdin.isatty():
        raise OptionError("audio", f"{STDIN} reads an audio file from standard input, but it is a terminal: pipe one in "
                          f"(e.g. ffmpeg -i talk.mp4 -f wav - | mdl-edge transcribe - ...)")
    return NamedBytes(sys.stdin.buffer.read(), STDIN)


def _source(args: argparse.Namespace, path: str) -> "str | NamedBytes":
    """What to decode for an input: the file, or for ``-`` the bytes read from standard input."""
    return args.stdin if path == STDIN and getattr(args, "stdin", None) is not None else path


def _report(args: argparse.Namespace, path: str, res: "Result | MdlEdgeError", streaming: bool, failed: list[str]) -> None:
    """One file's answer on stdout (a line, or a JSON object with --json); an error on stderr."""
    import json

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


def _answer_one_by_one(lm: "AudioLM", args: argparse.Namespace, prompt: str, options: object, streaming: bool, bar: "Progress",
                       report: Callable[[str, "Result | MdlEdgeError"], None]) -> None:
    """Files one at a time, text streamed as it comes with --stream."""
    for n_done, path in enumerate(args.audio):
        bar.update(n_done, Path(path).name)
        if streaming:
            print(f"{path}: ", end="", flush=True)
        try:
            res: Result | MdlEdgeError = lm.generate(
                _source(args, path), prompt, options, on_text=(lambda piece: print(piece, end="", flush=True)) if streaming else None,
                on_chunks=lambda k, total, name=Path(path).name: bar.update(n_done, f"{name}: chunk {k}/{total}"))
        except MdlEdgeError as e:
            res = e
        bar.close()
        report(path, res)


def _answer_together(lm: "AudioLM", args: argparse.Namespace, prompt: str, options: object, parallel: int, bar: "Progress",
                     report: Callable[[str, "Result | MdlEdgeError"], None]) -> None:
    """Files decoded together: JSON lines as each file finishes (each names its file), text in
    input order."""
    from .pipeline import Request

    pending: dict[int, Result | MdlEdgeError] = {}
    next_out = 0
    requests = (Request(audio=_source(args, p), prompt=prompt, options=options, tag=i) for i, p in enumerate(args.audio))
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


def _run_job(args: argparse.Namespace, task: str, prompt: str, options: object) -> int:
    """``--out`` (needed with ``--engine ray``): the inputs as a job whose rows are appended to
    ``--out``, which a rerun goes on from; on Ray Data, or in this process (``--engine local``)."""
    from .segments import SegmentOptions

    if not args.out:
        raise OptionError("out", "--engine ray writes its rows to a file: give --out RESULTS.jsonl (or .parquet)")
    if getattr(args, "output", None) or getattr(args, "format", None):
        raise OptionError("out", "--out writes every file's rows to one file; -o / --format write one output per input: give one or the other")
    segmenting = _segmenting(args) if task != "ask" else SegmentOptions(mode="none")
    encoder, decoder = _load_options(args, args.parallel)
    on_row = None if args.no_progress else lambda r: print(f"{r['file']}: {r.get('error') or r['text']}", file=sys.stderr)
    # Ctrl-C ends the process at once (after the batch of rows being written, if any): an orderly
    # end waits for the batches being answered (on Ray, for busy actors: minutes on a loaded
    # machine). Ray's local instance shares this process's fate.
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGINT, lambda *_: _leave_job_now(args.out)) if main_thread else None
    try:
        from .cluster import ClusterOptions, answer_files

        here = args.engine == "local"
        cluster = ClusterOptions(engine=args.engine, workers=args.workers, cpus_per_worker=args.threads if here else args.cpus_per_worker,
                                 address=args.ray_address, batch_size=args.batch_size, parallel=args.parallel, retries=args.retries,
                                 retry_errors=args.retry_errors)
        try:
            summary = answer_files(args.audio, args.model, out=args.out, prompt=prompt, task=task, options=options,  # type: ignore[arg-type]
                                   segmenting=segmenting, cluster=cluster, encoder=encoder, decoder=decoder, on_row=on_row)
        except ImportError as e:  # ray, or pyarrow for a .parquet output
            raise MdlEdgeError(f"this job needs the cluster extra (pip install 'mdl-edge[cluster]'): {e}") from e
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    print(f"mdl-edge: {summary.inputs} input(s): {summary.skipped} already in {summary.out}, {summary.answered} answered, "
          f"{summary.failed} failed ({summary.files_per_second:.2f} files/s over {summary.seconds:.1f} s)", file=sys.stderr)
    return 1 if summary.failed else 0


def _leave_job_now(out: str) -> None:
    """The SIGINT handler of a job with ``--out``: say where the rows are, then end the process as soon as
    no batch of rows is being written (from another thread: the main thread may hold the lock)."""
    from .cluster import OUTPUT_LOCK

    def end() -> None:
        with OUTPUT_LOCK:
            print(f"mdl-edge: interrupted; the rows so far are in {out}: run the same command again to answer the rest",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)

    threading.Thread(target=end, name="mdl-edge-interrupt", daemon=True).start()


def _load_options(args: argparse.Namespace, parallel: int) -> tuple[EncoderOptions, DecoderOptions]:
    """The load-time options of a runtime command, built (and validated) once from its arguments;
    a command without an option's flag gets the option's own default."""
    enc, dec = EncoderOptions(), DecoderOptions()
    encoder = EncoderOptions(variant=args.encoder, provider=getattr(args, "provider", enc.provider),
                             max_batch=getattr(args, "max_batch", enc.max_batch))
    decoder = DecoderOptions(variant=args.decoder, n_ctx=getattr(args, "n_ctx", dec.n_ctx), n_batch=getattr(args, "n_batch", dec.n_batch),
                             flash_attn=getattr(args, "flash_attn", dec.flash_attn), extra_bufts=_extra_bufts(args, parallel),
                             prefill=getattr(args, "prefill", dec.prefill))
    return encoder, decoder


def audio_lm(args: argparse.Namespace, parallel: int) -> AudioLM:
    """The one place a runtime command builds its :class:`AudioLM` (from its parsed arguments;
    a flag a command lacks takes the option's own default)."""
    from .pipeline import AudioLM

    encoder, decoder = _load_options(args, parallel)
    return AudioLM(args.model, threads=args.threads, encoder=encoder, decoder=decoder)


def _extra_bufts(args: argparse.Namespace, parallel: int) -> bool | None:
    """``--[no-]extra-bufts``, or by default: on when several sequences decode together and this
    llama.cpp build can repack safely (no AMX; repacked Q4_K_M decodes 1.4x faster at 4
    sequences), else :class:`DecoderOptions`' own default (on where the prompt engine runs the
    prompts)."""
    if getattr(args, "extra_bufts", None) is not None:
        return bool(args.extra_bufts)
    if parallel <= 1:
        return None
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
                            segmenting=SegmentOptions(max_segment=args.max_segment, max_pause=args.max_pause or None), n_ctx=args.n_ctx,
                            max_realtime=args.max_realtime)
    encoder, decoder = _load_options(args, args.parallel)
    serve(args.model, options, threads=args.threads, encoder=encoder, decoder=decoder)
    return 0


def _run_segments(args: argparse.Namespace, task: str, prompt: str, options: object, segmenting: object, mode: str,
                  sizes: list[int | None]) -> int:
    """Recordings as timed segments (long files, or any file with --format / -o): each file's
    segments are written as they are answered, to stdout or to -o (a file, or a folder that gets
    one output per input)."""
    from . import constants as C
    from .pipeline import Request
    from .progress import Progress
    from .writers import SegmentWriter, output_paths

    fmt = args.format or ("jsonl" if args.json else "txt")
    out = Path(args.output) if args.output else None
    many = len(args.audio) > 1
    if out is not None and many and not out.is_dir():
        raise OptionError("output", f"{out} must be an existing folder when several files are given (one output per input)")
    if out is None and many and fmt in ("srt", "vtt", "json"):
        # one document per input: several on stdout would make one invalid file
        raise OptionError("format", f"{fmt} is one document per input: give -o FOLDER for several inputs (or --format jsonl for one stream)")
    named = ["stdin" if p == STDIN else p for p in args.audio]  # "-" would name its output "-.srt"
    targets = output_paths(named, out, fmt) if out is not None and out.is_dir() else [out] * len(args.audio)
    failed: list[str] = []

    def emit(k: int, segments: Iterable[TimedSegment], bar: Progress) -> None:
        """Write input ``k``'s segments as they come (an error ends its output and is reported).
        A file output is written under ``NAME.partial`` and takes its name when the input is done,
        so an output cut short by a crash or Ctrl-C is never taken for a finished one."""
        path, target = args.audio[k], targets[k]
        partial = target.with_name(target.name + ".partial") if target is not None else None
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
        stream = open(partial, "w", encoding="utf-8") if partial is not None else sys.stdout
        if target is None and many and fmt == "txt":
            print(f"==> {path} <==", flush=True)
        writer = SegmentWriter(stream, fmt, source=str(path))
        error, finished = None, False
        try:
            try:
                for seg in segments:
                    bar.close()
                    writer.write(seg)
            except MdlEdgeError as e:
                error = str(e)
                failed.append(path)
                print(f"mdl-edge: error: {e}", file=sys.stderr)
            finished = True
        finally:
            bar.close()
            writer.close(error)
            if partial is not None and target is not None:
                stream.close()
                if finished:
                    partial.replace(target)
                    print(f"{path} -> {target}", file=sys.stderr)
                else:
                    print(f"{path}: cut short; what was written is in {partial}", file=sys.stderr)

    there = [k for k, t in enumerate(targets) if args.skip_existing and t is not None and t.exists()]
    for k in there:
        print(f"{args.audio[k]} -> {targets[k]} (there already)", file=sys.stderr)
    skip = set(there)
    todo = [k for k in range(len(args.audio)) if k not in skip]
    cut = [segmenting.cuts(mode, n) for n in sizes]  # type: ignore[attr-defined]
    with audio_lm(args, args.parallel) as lm:
        i = 0
        while i < len(todo):
            k = todo[i]
            if cut[k]:  # a long recording: its segments decoded together
                n, seg_s = sizes[k], segmenting.segment_seconds(mode)  # type: ignore[attr-defined]
                bar = Progress(max(1, -(-n // int(seg_s * C.SAMPLE_RATE))) if n else 1, "segments", enabled=not args.no_progress)
                emit(k, lm.segments(_source(args, args.audio[k]), prompt, options, mode=mode, segmenting=segmenting,  # type: ignore[arg-type]
                                    parallel=args.parallel, on_segment=lambda j, name=Path(args.audio[k]).name: bar.update(j, name)), bar)
                i += 1
                continue
            # a run of files answered whole: decoded together, written in input order
            run = list(itertools.takewhile(lambda j: not cut[j], todo[i:]))
            bar = Progress(len(run), "files", enabled=not args.no_progress)
            done: dict[int, Result | MdlEdgeError] = {}
            written = 0
            requests = (Request(audio=_source(args, args.audio[j]), prompt=prompt, options=options, tag=j) for j in run)  # type: ignore[arg-type]
            for n_done, (req, res) in enumerate(lm.run(requests, parallel=args.parallel), start=1):
                bar.update(n_done, Path(args.audio[req.tag]).name)
                done[req.tag] = res
                while written < len(run) and run[written] in done:
                    emit(run[written], _whole_segment(done.pop(run[written])), bar)
                    written += 1
            i += len(run)
    if there:
        print(f"mdl-edge: {len(there)} of {len(args.audio)} input(s) skipped, their outputs there already (--skip-existing)", file=sys.stderr)
    if failed:
        print(f"mdl-edge: {len(failed)} of {len(args.audio)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _whole_segment(res: "Result | MdlEdgeError") -> Iterator["TimedSegment"]:
    """A file answered whole as its one segment (its error raised where the writer reports it)."""
    if isinstance(res, MdlEdgeError):
        raise res
    yield res.as_segment()


def _command_plugins() -> list:
    """The ``register(subparsers)`` functions of packages that add commands (the export-side
    commands of ``mdl_edge.export`` among them), from the ``mdl_edge.commands`` entry points: the
    runtime names none of them."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group="mdl_edge.commands"), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mdl-edge`` (exposed for docs and tests). Defaults come from the
    option objects the commands build, stated there once."""
    from .cluster import ClusterOptions
    from .segments import SegmentOptions
    from .server import ServerOptions

    seg_d, cl_d, sv_d = SegmentOptions(), ClusterOptions(), ServerOptions()
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
            "  mdl-edge live --mic --model bundle                # a live transcript from the microphone\n"
        ),
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for task, helptext in (("caption", "caption audio files"), ("transcribe", "transcribe speech in audio files"), ("ask", "ask a question about an audio file")):
        t = sub.add_parser(task, help=helptext)
        t.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3; more with ffmpeg), folders (every audio file under them), globs, list files, or - (a file on standard input)")
        t.add_argument("--model", required=True, help="bundle folder made by `mdl-edge export`")
        if task == "ask":
            t.add_argument("-q", "--question", required=True)
        if task == "transcribe":
            t.add_argument("--language", help="language tag, e.g. en, zh (adds <|en|> to the prompt)")
        t.add_argument("--encoder", help="encoder variant (default: the bundle's)")
        t.add_argument("--decoder", help="decoder variant (default: the bundle's)")
        t.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="new-token limit (default: %(default)s)")
        t.add_argument("--temperature", type=float, default=SamplingOptions().temperature, help="0 = greedy (default)")
        t.add_argument("--seed", type=int, default=SamplingOptions().seed, help="sampling seed (with --temperature > 0)")
        t.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
        t.add_argument("--stream", action="store_true", help="print tokens as they are generated")
        if task != "ask":
            _add_segment_args(t, seg_d)
        t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (it is off anyway when stderr is not a terminal)")
        _add_cluster_args(t, cl_d)
        _add_performance_args(t)
        t.set_defaults(func=lambda a, task=task: _run_task(a, task), parser=t)

    _add_serve_parser(sub, sv_d)
    from .live_cli import add_live_parser

    add_live_parser(sub)

    for register in _command_plugins():
        register(sub)

    return p


def _segmenting(args: argparse.Namespace) -> "SegmentOptions":
    """The segment options of a caption or transcribe command (validated where built)."""
    from .segments import SegmentOptions

    return SegmentOptions(mode=args.segment, max_segment=args.max_segment, window=args.window,
                          max_pause=args.max_pause or None)


def _add_segment_args(t: argparse.ArgumentParser, seg_d: "SegmentOptions") -> None:
    seg = t.add_argument_group("long recordings (files longer than a segment are cut and answered segment by segment)")
    seg.add_argument("--segment", default=seg_d.mode, choices=("auto", "vad", "window", "none"),
                     help="auto (default): files longer than one segment are cut, at pauses to transcribe (vad), in fixed "
                          "windows to caption; vad / window: every file; none: the whole file at once")
    seg.add_argument("--max-segment", type=float, default=seg_d.max_segment, metavar="S", help="longest vad segment in seconds (default: %(default)s)")
    seg.add_argument("--window", type=float, default=seg_d.window, metavar="S", help="caption window in seconds (default: %(default)s)")
    seg.add_argument("--max-pause", type=float, default=seg_d.max_pause, metavar="S",
                     help=f"vad segments leave out pauses longer than this, but for {seg_d.pause_margin:g} s at each side; "
                          "0 keeps every pause (segments then tile the recording; default: %(default)s)")
    seg.add_argument("--format", choices=("txt", "json", "jsonl", "srt", "vtt"),
                     help="timed segments in this format (default for long files: txt; jsonl with --json)")
    seg.add_argument("-o", "--output", help="write there: a file, or for several inputs an existing folder (one output per input, mirroring the inputs' folders)")
    seg.add_argument("--skip-existing", action="store_true",
                     help="with -o: inputs whose output is there already are skipped (an output is written as NAME.partial and named "
                          "when its input is done, so one cut short is answered again)")


def _add_cluster_args(t: argparse.ArgumentParser, cl_d: "ClusterOptions") -> None:
    from .cluster import ENGINES

    cl = t.add_argument_group("many files: a job whose rows go to --out, which a rerun goes on from; here, or on Ray Data (--engine ray: the `cluster` extra)")
    cl.add_argument("--engine", choices=ENGINES, default="local",
                    help="local (default): this process; ray: a pool of Ray actors, rows appended to --out as they come")
    cl.add_argument("--out", help="a job's results, one row per segment, as JSON Lines (or .parquet): with --engine ray or in this process; a rerun with the same --out answers only what is missing")
    cl.add_argument("--workers", type=int, default=cl_d.workers, help="with --engine ray: actors, each loading the bundle once (default: %(default)s)")
    cl.add_argument("--cpus-per-worker", type=int, help="with --engine ray: CPUs (threads) per actor (default: a local instance's cores shared out)")
    cl.add_argument("--ray-address", help="with --engine ray: a running cluster (auto, ray://HOST:10001; default: start a local instance)")
    cl.add_argument("--batch-size", type=int, default=cl_d.batch_size, help="with --engine ray: files per actor call (default: %(default)s)")
    cl.add_argument("--retries", type=int, default=cl_d.retries, help="with --engine ray: tries again of a batch whose actor died (default: %(default)s)")
    cl.add_argument("--retry-errors", action="store_true", help="with --out: a rerun also retries files whose row is an error")


def _add_performance_args(t: argparse.ArgumentParser) -> None:
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
                      help="let llama.cpp repack weights for this CPU (faster decoding; default: on when several "
                           "sequences decode together or the prompt engine runs the prompts, and the build has no AMX)")
    perf.add_argument("--prefill", choices=PREFILL_CHOICES, default=DecoderOptions().prefill,
                      help="who evaluates the prompt: the bundle's int8 prompt engine (onnx) or llama.cpp (llama); auto: the "
                           "engine for a quantized decoder (default: %(default)s)")
    perf.add_argument("--provider", default=EncoderOptions().provider, help="encoder execution provider: cpu or cuda (default: %(default)s)")
    perf.add_argument("--max-batch", type=int, help="encoder chunks per ONNX run (default: 1 on cpu, 8 on cuda)")


def _add_serve_parser(sub: "argparse._SubParsersAction", sv_d: "ServerOptions") -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the `server` extra)",
                        description="Serve a bundle through OpenAI's audio API: POST /v1/audio/transcriptions, POST "
                                    "/v1/chat/completions (input_audio parts), the Realtime transcription WebSocket /v1/realtime, "
                                    "GET /v1/models, /health, /metrics, and a page at /.")
    sv.add_argument("--model", required=True, help="bundle folder made by `mdl-edge export`")
    sv.add_argument("--host", default=sv_d.host, help="address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=sv_d.port, help="(default: %(default)s)")
    sv.add_argument("--api-key", default=os.environ.get("MDL_EDGE_API_KEY"),
                    help="require Authorization: Bearer KEY on /v1 and /metrics (default: $MDL_EDGE_API_KEY, else none)")
    sv.add_argument("--parallel", type=int, default=default_parallel(), metavar="N",
                    help="requests decoded together (default here: %(default)s)")
    sv.add_argument("--max-queue", type=int, default=sv_d.max_queue, metavar="N", help="admitted requests waiting beyond those; more get 503 (default: %(default)s)")
    sv.add_argument("--max-realtime", type=int, default=sv_d.max_realtime, metavar="N",
                    help="open Realtime WebSocket connections (/v1/realtime); more are refused (default: %(default)s)")
    sv.add_argument("--max-upload-mb", type=float, default=sv_d.max_upload_mb, help="largest upload; more gets 413 (default: %(default)s)")
    sv.add_argument("--max-audio-s", type=float, default=sv_d.max_audio_s, help="longest recording; more gets 413 (default: %(default)s)")
    sv.add_argument("--max-segment", type=float, default=sv_d.segmenting.max_segment, metavar="S",
                    help="longer transcriptions are cut at pauses into segments of at most S seconds (default: %(default)s)")
    sv.add_argument("--max-pause", type=float, default=sv_d.segmenting.max_pause, metavar="S",
                    help="transcriptions cut into segments leave out pauses longer than this; 0 keeps every pause (default: %(default)s)")
    sv.add_argument("--n-ctx", type=int, help="decoder positions shared by the requests decoding together, allocated at start "
                    "(default: 2048 per --parallel)")
    sv.add_argument("--model-id", help="the model's name in /v1/models (default: the bundle folder's name)")
    sv.add_argument("--encoder", help="encoder variant (default: the bundle's)")
    sv.add_argument("--decoder", help="decoder variant (default: the bundle's)")
    sv.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    sv.add_argument("--extra-bufts", action=argparse.BooleanOptionalAction, default=None,
                    help="let llama.cpp repack weights for this CPU (default: on when --parallel > 1 or the prompt "
                         "engine runs the prompts, and the build has no AMX)")
    sv.set_defaults(func=_cmd_serve, parser=sv)


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
        # the parser's help lists each of its flags (argparse keeps its own table private)
        if parser is not None and re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", parser.format_help()):
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
