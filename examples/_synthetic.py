"""Shared by the examples: a tiny synthetic bundle (random weights) and generated clips, cached
in a temp folder so the examples run anywhere without downloads."""

from __future__ import annotations

import tempfile
from pathlib import Path

WORK = Path(tempfile.gettempdir()) / "mdl-edge-examples"


def tiny_bundle() -> Path:
    """Synthesize and export a tiny model once (needs the export extra)."""
    from mdl_edge.export.convert.bundle import export_bundle
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint
    from mdl_edge.runtime.manifest import FORMAT_VERSION

    bundle = WORK / f"bundle-v{FORMAT_VERSION}"
    if not (bundle / "manifest.json").is_file():
        ckpt = write_synthetic_checkpoint("tiny", WORK / "checkpoint", overwrite=True)
        export_bundle(ckpt, bundle, encoders=["fp32", "int8"], decoders=["f16", "Q4_K_M"], progress=lambda *_: None)
    return bundle


def clip_files(n: int = 3) -> list[Path]:
    """A few generated WAV clips of different lengths."""
    import soundfile as sf

    from mdl_edge.runtime.audio import demo_clip

    folder = WORK / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"clip{i}.wav"
        if not p.exists():
            sf.write(p, demo_clip(2.0 + 3.0 * i, seed=i), 16000)
        paths.append(p)
    return paths
