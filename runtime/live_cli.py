"""``mdl-edge live``: captions or a transcript as the audio arrives, from a microphone, a file
played at real-time pace, or raw PCM on stdin (ffmpeg's ``-f s16le -``); partials replaced in
place on a terminal, finals committed; ``--format jsonl|srt|vtt`` for machines."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import IO, TYPE_CHECKING, Iterator

import numpy as np

from .errors import MdlEdgeError, OptionError

if TYPE_CHECKING:
    from .live import LiveEvent, LiveSession

LIVE_FORMATS = ("text", "jsonl", "srt", "vtt")
PCM_FORMATS = {"s16le": "<i2", "f32le": "<f4"}
BLOCK_SECONDS = 0.1


def add_live_parser(sub: "argparse._SubParsersAction") -> None:
    from .live import LiveOptions

    d = LiveOptions()
    lv = sub.add_parser("live", help="live captions or transcript from a microphone, a file in real time, or PCM on stdin",
                        description="Transcribe (or caption) audio as it arrives: utterances cut at pauses, partial text "
                                    "while one is open, a final at its end.",
                        epilog="examples:\n"
                               "  mdl-edge live --mic --model bundle\n"
                               "  mdl-edge live talk.wav --realtime --model bundle --format srt -o talk.srt\n"
                               "  ffmpeg -i http://radio/stream -f s16le -ac 1 -ar 16000 - | mdl-edge live - --model bundle\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lv.add_argument("source", nargs="?", help="an audio file, or - for raw PCM on stdin (see --rate); none with --mic")
    lv.add_argument("--model", help="bundle folder made by `mdl-edge export`")
    src = lv.add_argument_group("source")
    src.add_argument("--mic", action="store_true", help="the microphone (needs the `live` extra: sounddevice)")
    src.add_argument("--device", help="with --mic: input device number or name (see --list-devices)")
    src.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    src.add_argument("--realtime", action="store_true", help="play the file at real-time pace (as a microphone would deliver it)")
    src.add_argument("--rate", type=int, default=16000, help="stdin PCM (and --mic) sample rate (default: %(default)s)")
    src.add_argument("--channels", type=int, default=1, help="stdin PCM channels (default: %(default)s)")
    src.add_argument("--sample-format", choices=tuple(PCM_FORMATS), default="s16le", help="stdin PCM samples (default: %(default)s)")
    what = lv.add_argument_group("what is produced")
    what.add_argument("--task", choices=("transcribe", "caption"), default=d.task, help="(default: %(default)s)")
    what.add_argument("--language", help="language tag for transcripts, e.g. en")
    what.add_argument("--silence", type=float, default=d.silence, metavar="S", help="a pause this long ends an utterance (default: %(default)s)")
    what.add_argument("--max-utterance", type=float, default=d.max_utterance, metavar="S", help="longest utterance (default: %(default)s)")
    what.add_argument("--window", type=float, default=d.window, metavar="S", help="caption window (default: %(default)s)")
    what.add_argument("--hop", type=float, default=d.hop, metavar="S", help="a caption window starts every S seconds (default: %(default)s)")
    what.add_argument("--partial-every", type=float, default=d.partial_every, metavar="S",
                      help="partial results at most every S seconds of audio; 0: none (default: %(default)s)")
    what.add_argument("--max-new-tokens", type=int, default=64, help="new-token limit per result (default: %(default)s)")
    what.add_argument("--format", choices=LIVE_FORMATS, default="text",
                      help="text (default: partials in place on a terminal, finals as lines), jsonl (every event), srt, vtt (finals)")
    what.add_argument("-o", "--output", help="write there instead of stdout")
    perf = lv.add_argument_group("performance")
    perf.add_argument("--encoder", help="encoder variant (default: the bundle's)")
    perf.add_argument("--decoder", help="decoder variant (default: the bundle's)")
    perf.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    lv.set_defaults(func=cmd_live, parser=lv)


def _list_devices() -> int:
    sd = _sounddevice()
    inputs = [(i, d) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
    if not inputs:
        print("no input devices", file=sys.stderr)
        return 1
    for i, d in inputs:
        print(f"{i}: {d['name']} ({d['max_input_channels']} ch, {d['default_samplerate']:.0f} Hz)")
    return 0


def _sounddevice():  # type: ignore[no-untyped-def]
    try:
        import sounddevice
    except ImportError as e:
        raise MdlEdgeError(f"--mic needs the live extra (pip install 'mdl-edge[live]'): {e}") from e
    except OSError as e:  # the PortAudio library is missing
        raise MdlEdgeError(f"--mic needs PortAudio (apt-get install libportaudio2): {e}") from e
    return sounddevice


def _stdin_blocks(rate: int, channels: int, fmt: str) -> Iterator[np.ndarray]:
    dtype = np.dtype(PCM_FORMATS[fmt])
    frame = dtype.itemsize * channels
    want = max(1, int(rate * BLOCK_SECONDS)) * frame
    stream = sys.stdin.buffer
    rest = b""
    while True:
        data = stream.read(want)
        if not data:
            break
        data = rest + data
        usable = len(data) // frame * frame
        rest = data[usable:]
        if usable:
            x = np.frombuffer(data[:usable], dtype)
            yield x.reshape(-1, channels) if channels > 1 else x
    if rest:
        print(f"mdl-edge: stdin ended inside a sample frame ({len(rest)} stray byte(s) ignored)", file=sys.stderr)


class EventPrinter:
    """Writes a live stream's events in one of :data:`LIVE_FORMATS` (from any thread)."""

    def __init__(self, out: IO[str], fmt: str, source: str) -> None:
        from .writers import SegmentWriter

        self.out, self.fmt = out, fmt
        self.tty = fmt == "text" and out.isatty()
        self.lock = threading.Lock()
        self.writer = SegmentWriter(out, fmt, source=source) if fmt in ("srt", "vtt") else None
        self.errors = 0

    def __call__(self, ev: "LiveEvent") -> None:
        from .segments import TimedSegment
        from .writers import timestamp

        with self.lock:
            if ev.type == "error":
                self.errors += 1
                print(f"mdl-edge: error: {ev.text}", file=sys.stderr, flush=True)
            if ev.type == "dropped":
                print(f"mdl-edge: dropped {ev.end - ev.start:.2f} s of audio at {ev.start:.2f} s (the machine is not keeping up)",
                      file=sys.stderr, flush=True)
            if self.fmt == "jsonl":
                self.out.write(json.dumps({"type": ev.type, "item": ev.item, "start": round(ev.start, 3), "end": round(ev.end, 3),
                                           "text": ev.text}, ensure_ascii=False) + "\n")
                self.out.flush()
            elif self.writer is not None:
                if ev.type == "final":
                    self.writer.write(TimedSegment(ev.item, ev.start, ev.end, ev.text))
            elif ev.type == "partial" and self.tty:
                self.out.write(f"\r\033[K[{timestamp(ev.start, '.')}] {ev.text} …")
                self.out.flush()
            elif ev.type == "final":
                self.out.write(("\r\033[K" if self.tty else "") + f"[{timestamp(ev.start, '.')} --> {timestamp(ev.end, '.')}] {ev.text}\n")
                self.out.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cmd_live(args: argparse.Namespace) -> int:
    from .audio import iter_audio
    from .live import LiveOptions, LiveSession
    from .cli import audio_lm
    from .live_audio import paced
    from .options import GenerationOptions

    if args.list_devices:
        return _list_devices()
    if args.mic == (args.source is not None):
        raise OptionError("source", "give an audio file, - for PCM on stdin, or --mic (one of them)")
    if not args.model:
        raise OptionError("model", "the bundle to run: --model BUNDLE")
    if args.channels < 1 or args.rate <= 0:
        raise OptionError("rate" if args.rate <= 0 else "channels", "must be positive")
    options = LiveOptions(task=args.task, language=args.language, silence=args.silence, max_utterance=args.max_utterance,
                          window=args.window, hop=args.hop, partial_every=args.partial_every,
                          generation=GenerationOptions(max_new_tokens=args.max_new_tokens), drop=args.mic)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    name = "microphone" if args.mic else "stdin" if args.source == "-" else args.source
    printer = EventPrinter(out, args.format, name)
    try:
        with audio_lm(args, 1) as lm:
            rate = args.rate if args.mic or args.source == "-" else 16000
            session = LiveSession(lm, options, sample_rate=rate, on_event=printer, name=name)
            try:
                if args.mic:
                    _from_mic(session, args)
                else:
                    blocks = _stdin_blocks(args.rate, args.channels, args.sample_format) if args.source == "-" else iter_audio(args.source)
                    if args.realtime:
                        blocks = paced(blocks, rate, block_seconds=BLOCK_SECONDS)
                    for block in blocks:
                        session.push(block)
            except KeyboardInterrupt:
                pass  # what was heard so far is still finalised
            except BaseException:
                session.cancel()
                raise
            session.finish()
    finally:
        printer.close()
        if out is not sys.stdout:
            out.close()
    return 1 if printer.errors else 0


def _from_mic(session: "LiveSession", args: argparse.Namespace) -> None:
    """Push microphone blocks until Ctrl-C (the audio callback never waits: a block the machine
    cannot take is dropped and counted)."""
    sd = _sounddevice()
    device: int | str | None = int(args.device) if args.device and args.device.isdigit() else args.device
    stop = threading.Event()

    def callback(indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        if status:
            print(f"mdl-edge: microphone: {status}", file=sys.stderr)
        try:
            session.push(indata.copy())
        except MdlEdgeError:
            stop.set()

    # Ctrl-C (SIGINT) is how a microphone stream ends. A process started in the background
    # inherits SIGINT ignored (POSIX shells do that to background jobs), and Python then leaves it
    # ignored: such a process listened for ever, however often it was sent SIGINT.
    restore = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sd.InputStream(samplerate=args.rate, channels=1, dtype="float32", device=device,
                            blocksize=int(args.rate * BLOCK_SECONDS), callback=callback):
            print("mdl-edge: listening (Ctrl-C to stop)", file=sys.stderr, flush=True)
            while not stop.wait(0.2) and not session.ended:
                pass
    except sd.PortAudioError as e:
        raise MdlEdgeError(f"microphone {args.device or '(default)'}: {e}") from e
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
