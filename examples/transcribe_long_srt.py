"""Transcribe a long recording into SubRip subtitles: cut at pauses, segments decoded together,
each cue written as soon as its segment is done.
    python examples/transcribe_long_srt.py [AUDIO] [--model BUNDLE] [--out talk.srt] [--max-segment 30]"""

import argparse
import sys

from _synthetic import WORK, tiny_bundle

from mdl_edge import AudioLM, GenerationOptions, SegmentOptions
from mdl_edge.runtime.writers import SegmentWriter

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model")
ap.add_argument("--out", default="-")
ap.add_argument("--max-segment", type=float, default=30.0)
args = ap.parse_args()

if args.audio is None:  # a generated 75 s recording
    import soundfile as sf

    from mdl_edge.runtime.audio import demo_clip

    args.audio = WORK / "long.wav"
    WORK.mkdir(parents=True, exist_ok=True)
    sf.write(args.audio, demo_clip(75.0), 16000)
out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
writer = SegmentWriter(out, "srt", source=str(args.audio))
with AudioLM(args.model or tiny_bundle()) as lm:
    for seg in lm.transcribe_segments(args.audio, GenerationOptions(max_new_tokens=16), parallel=4,
                                      segmenting=SegmentOptions(max_segment=args.max_segment)):
        writer.write(seg)
writer.close()
