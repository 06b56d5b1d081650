"""Timed segments as files: plain text, JSON, JSON lines, SubRip (SRT) and WebVTT.

Every writer but JSON writes each segment as it comes and flushes, so a crash or Ctrl-C keeps
what was done; JSON (one document) is written when the file ends.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, Sequence

from .errors import OptionError
from .segments import TimedSegment

FORMATS = ("txt", "json", "jsonl", "srt", "vtt")


def output_paths(inputs: Sequence[str], folder: Path, fmt: str) -> list[Path]:
    """Where each input's segments go in ``folder``: its path relative to the folder all inputs
    share, with its ending replaced by ``fmt``. Inputs of one folder give ``folder/NAME.fmt``; a
    tree of folders (a folder given as input) gives the same tree. Two inputs that would still
    share an output (``a.wav`` and ``a.flac``) keep their ending (``a.wav.srt``), so no input's
    output overwrites another's."""
    absolute = [Path(os.path.abspath(p)) for p in inputs]
    try:
        common = Path(os.path.commonpath([str(p.parent) for p in absolute]))
        relative = [p.relative_to(common) for p in absolute]
    except ValueError:  # no shared folder (Windows drives): names alone
        relative = [Path(p.name) for p in absolute]
    plain = [r.with_suffix(f".{fmt}") for r in relative]
    sources: dict[Path, set[Path]] = defaultdict(set)
    for src, out in zip(absolute, plain):
        sources[out].add(src)
    return [folder / (out if len(sources[out]) == 1 else rel.with_name(f"{rel.name}.{fmt}"))
            for rel, out in zip(relative, plain)]


def timestamp(seconds: float, sep: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT; ``sep="."`` for WebVTT), rounded to the millisecond."""
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(text: str) -> str:
    # a blank line ends a cue in SRT and WebVTT; "-->" would start a timing line in WebVTT
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines).replace("-->", "->") or "…"


class SegmentWriter:
    """Writes the segments of one recording to ``out`` in ``fmt`` (one of :data:`FORMATS`);
    ``source`` names the recording in JSON output."""

    def __init__(self, out: IO[str], fmt: str, *, source: str = "") -> None:
        if fmt not in FORMATS:
            raise OptionError("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.out, self.fmt, self.source = out, fmt, source
        self._segments: list[dict[str, Any]] = []
        self._n = 0
        if fmt == "vtt":
            out.write("WEBVTT\n\n")
            out.flush()

    def write(self, seg: TimedSegment) -> None:
        self._n += 1
        item = {"index": seg.index, "start": round(seg.start, 3), "end": round(seg.end, 3), "text": seg.text,
                "token_ids": list(seg.token_ids), "stop_reason": seg.stop_reason, "timings": seg.timings}
        if self.fmt == "json":
            self._segments.append(item)
            return
        if self.fmt == "txt":
            self.out.write(f"[{timestamp(seg.start, '.')} --> {timestamp(seg.end, '.')}] {seg.text.strip()}\n")
        elif self.fmt == "jsonl":
            self.out.write(json.dumps({"file": self.source, **item}, ensure_ascii=False) + "\n")
        elif self.fmt == "srt":
            self.out.write(f"{self._n}\n{timestamp(seg.start)} --> {timestamp(seg.end)}\n{_cue_text(seg.text)}\n\n")
        else:
            self.out.write(f"{timestamp(seg.start, '.')} --> {timestamp(seg.end, '.')}\n{_cue_text(seg.text)}\n\n")
        self.out.flush()

    def close(self, error: str | None = None) -> None:
        """End the output (JSON: the document, with ``error`` if the recording failed part-way;
        JSON lines: an error line naming the file)."""
        if self.fmt == "jsonl" and error:
            self.out.write(json.dumps({"file": self.source, "error": error}, ensure_ascii=False) + "\n")
        if self.fmt == "json":
            doc: dict[str, Any] = {"file": self.source, "segments": self._segments}
            if error:
                doc["error"] = error
            self.out.write(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
        self.out.flush()
