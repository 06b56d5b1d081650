"""Model bundles: a folder holding everything the runtime needs, described by ``manifest.json``.

Written by ``mdl-edge export`` (``export/bundle.py``); read and checked here, torch-free. The
manifest names each piece and its variants, and the pieces are checked to belong together
(source checkpoint hash, widths, special-token ids) before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

MANIFEST = "manifest.json"
FORMAT = "mdl-edge-bundle"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Bundle:
    """A checked bundle folder."""

    dir: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        d = Path(path)
        m = d / MANIFEST
        if not m.is_file():
            hint = " (it looks like a Hugging Face checkpoint: run `mdl-edge export` on it first)" if (d / "config.json").is_file() else ""
            raise CheckpointError(f"{d}: no {MANIFEST}; not an mdl-edge bundle{hint}")
        try:
            manifest = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{m}: not readable as JSON: {e}") from e
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{m}: not an mdl-edge bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{m}: bundle format version {manifest.get('format_version')} (this mdl-edge reads {FORMAT_VERSION})")
        for part in ("encoder", "projector", "decoder", "tokens"):
            if part not in manifest:
                raise CheckpointError(f"{m}: the manifest has no {part!r} section")
        return cls(d, manifest)

    def variant(self, part: str, name: str | None) -> tuple[str, Path]:
        """The chosen (or default: first listed) variant of ``encoder``/``decoder`` and its file."""
        variants: dict[str, Any] = self.manifest[part]["variants"]
        if not variants:
            raise CheckpointError(f"{self.dir}: the bundle has no {part} variants")
        name = name or self.manifest[part].get("default") or next(iter(variants))
        if name not in variants:
            raise ConfigError(f"{self.dir}: no {part} variant {name!r}; this bundle has {', '.join(variants)}")
        path = self.file(variants[name]["file"])
        return name, path

    def file(self, name: str) -> Path:
        """A file of the bundle; names must stay inside the folder."""
        p = (self.dir / name).resolve()
        if self.dir.resolve() not in p.parents:
            raise CheckpointError(f"{self.dir}: manifest entry {name!r} points outside the bundle")
        if not p.is_file():
            raise CheckpointError(f"{self.dir}: {name} is listed in the manifest but missing")
        return p
