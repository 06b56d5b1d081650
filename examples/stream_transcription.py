"""Stream a transcription to the terminal as tokens arrive.
    python examples/stream_transcription.py [AUDIO] [--model BUNDLE] [--language en]"""

import argparse

from _synthetic import clip_files, tiny_bundle

from mdl_edge.runtime.pipeline import TRANSCRIBE_PROMPT, AudioLM

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model")
ap.add_argument("--language")
args = ap.parse_args()

prompt = TRANSCRIBE_PROMPT + (f" <|{args.language}|>" if args.language else "")
pieces = 0
with AudioLM(args.model or tiny_bundle()) as lm:
    for piece in lm.stream(args.audio or clip_files()[0], prompt, max_new_tokens=32):
        print(piece, end="", flush=True)
        pieces += 1
print(f"\n[{pieces} text pieces streamed]")
