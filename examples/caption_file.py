"""Caption one audio file.   python examples/caption_file.py [AUDIO] [--model BUNDLE]"""

import argparse

from _synthetic import clip_files, tiny_bundle

from mdl_edge import AudioLM, GenerationOptions

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model", help="bundle folder (default: a tiny synthetic one, random weights)")
args = ap.parse_args()

with AudioLM(args.model or tiny_bundle()) as lm:
    result = lm.caption(args.audio or clip_files()[1], GenerationOptions(max_new_tokens=24))
print(f"caption: {result.text!r}")
print(f"{result.audio_seconds:.1f} s of audio, {result.n_audio_tokens} audio tokens, {result.tokens_per_second:.0f} tok/s")
