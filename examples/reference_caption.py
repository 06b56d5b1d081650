"""Caption a clip with the full-precision PyTorch reference.

    python examples/reference_caption.py [AUDIO] [--model DIR]

Without --model a tiny synthetic checkpoint (random weights) is written to a temp folder, and
without AUDIO a generated 5 s clip is used, so the script runs anywhere.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mdl_edge.export.reference.model import MiDashengLM
from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.audio import demo_clip, load_audio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("audio", nargs="?", help="audio file (default: a generated clip)")
    ap.add_argument("--model", help="official-layout checkpoint folder (default: synthetic tiny)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    model_dir = Path(args.model) if args.model else write_synthetic_checkpoint("tiny", Path(tempfile.mkdtemp()) / "tiny")
    wave = load_audio(args.audio) if args.audio else demo_clip(5.0)
    model = MiDashengLM.from_pretrained(model_dir)
    result = model.generate(wave, "Caption the audio.", max_new_tokens=args.max_new_tokens)
    print(f"{wave.size / C.SAMPLE_RATE:.2f} s -> {result.n_audio_tokens} audio tokens")
    print(f"caption: {result.text!r}  (token ids {list(result.token_ids)})")
    print("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()))


if __name__ == "__main__":
    main()
