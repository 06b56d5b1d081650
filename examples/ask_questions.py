"""Ask several questions about one clip: the clip is encoded once, and with the audio first in
the prompt the decoder reuses its evaluated audio prefix.   python examples/ask_questions.py"""

import argparse

from _synthetic import clip_files, tiny_bundle

from mdl_edge import AudioLM, GenerationOptions

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model")
args = ap.parse_args()

questions = ["What sound is heard?", "Is there speech?", "What is the acoustic environment?"]
options = GenerationOptions(max_new_tokens=16, audio_first=True)
with AudioLM(args.model or tiny_bundle()) as lm:
    for q in questions:
        r = lm.ask(args.audio or clip_files()[2], q, options)
        print(f"Q: {q}\nA: {r.text!r}  (encoder {r.timings['encoder'] * 1000:.0f} ms, prefill {r.timings['prefill'] * 1000:.0f} ms)")
