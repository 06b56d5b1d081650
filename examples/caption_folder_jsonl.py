"""Caption every audio file of a folder into JSON Lines, several files decoded together
(continuous batching); rows come as each file finishes.
    python examples/caption_folder_jsonl.py [FOLDER] [--model BUNDLE] [--out captions.jsonl] [--parallel 4]"""

import argparse
import json
import sys
from pathlib import Path

from _synthetic import clip_files, tiny_bundle

from mdl_edge import AudioLM, GenerationOptions, Request

ap = argparse.ArgumentParser()
ap.add_argument("folder", nargs="?")
ap.add_argument("--model")
ap.add_argument("--out", default="-")
ap.add_argument("--parallel", type=int, default=4)
args = ap.parse_args()

files = sorted(p for p in Path(args.folder).iterdir() if p.is_file()) if args.folder else clip_files()
out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
options = GenerationOptions(max_new_tokens=24)
with AudioLM(args.model or tiny_bundle()) as lm:
    requests = (Request(audio=f, options=options, tag=f) for f in files)  # read lazily
    for req, res in lm.run(requests, parallel=args.parallel):
        if isinstance(res, Exception):  # a bad file is reported, the others still run
            row = {"file": str(req.tag), "error": str(res)}
        else:
            row = {"file": str(req.tag), "caption": res.text, "audio_seconds": res.audio_seconds}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
