"""Caption every audio file of a folder into JSON Lines.
    python examples/caption_folder_jsonl.py [FOLDER] [--model BUNDLE] [--out captions.jsonl]"""

import argparse
import json
import sys
from pathlib import Path

from _synthetic import clip_files, tiny_bundle

from mdl_edge.runtime.errors import MdlEdgeError
from mdl_edge import AudioLM, GenerationOptions

ap = argparse.ArgumentParser()
ap.add_argument("folder", nargs="?")
ap.add_argument("--model")
ap.add_argument("--out", default="-")
args = ap.parse_args()

files = sorted(p for p in Path(args.folder).iterdir() if p.is_file()) if args.folder else clip_files()
out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
with AudioLM(args.model or tiny_bundle()) as lm:
    for f in files:
        try:
            r = lm.caption(f, GenerationOptions(max_new_tokens=24))
            row = {"file": str(f), "caption": r.text, "audio_seconds": r.audio_seconds}
        except MdlEdgeError as e:  # a bad file is reported, the others still run
            row = {"file": str(f), "error": str(e)}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
