"""Stream a transcription to the terminal as tokens arrive.
    python examples/stream_transcription.py [AUDIO] [--model BUNDLE] [--language en]"""

import argparse

from _synthetic import clip_files, tiny_bundle

from mdl_edge import AudioLM, GenerationOptions
from mdl_edge.runtime.prompt import transcribe_prompt

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model")
ap.add_argument("--language")
args = ap.parse_args()

pieces = 0
with AudioLM(args.model or tiny_bundle()) as lm:
    stream = lm.stream(args.audio or clip_files()[0], transcribe_prompt(args.language), GenerationOptions(max_new_tokens=32))
    for piece in stream:  # breaking out of this loop stops the generation at once
        print(piece, end="", flush=True)
        pieces += 1
    result = stream.result()
print(f"\n[{pieces} text pieces streamed, {len(result.token_ids)} tokens, stopped by {result.stop_reason}]")
