"""A minimal progress bar on stderr: only when stderr is a terminal and the caller opted in."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """``Progress(total, "files")``; ``update(k)`` redraws one line, ``close()`` ends it.
    Draws nothing when disabled or when the stream is not a terminal."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn = False

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * min(done, self.total) / self.total)
        self.stream.write(f"\r{self.label} [{'#' * filled}{' ' * (width - filled)}] {done}/{self.total} {note[:40]:<40}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self.drawn = False
