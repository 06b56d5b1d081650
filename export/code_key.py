"""Keys of generated artefacts (the trained toy model, the demo's bundle) from the code that makes
them: what the code does, not how it is written down, so a comment, a docstring or a reflowed
line keeps the key and any change of behaviour changes it."""

from __future__ import annotations

import hashlib
import io
import tokenize
from collections.abc import Iterable
from pathlib import Path

_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}
_STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
_WORDS = {tokenize.NAME, tokenize.NUMBER, tokenize.STRING}


def behaviour_text(source: str) -> str:
    """``source`` with comments, blank lines, spacing inside lines and statements made of a bare
    string (docstrings) left out. Indentation and line structure stay: they are the program."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in _SKIPPED]
    out: list[str] = []
    prev_type = tokenize.NEWLINE
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.type == tokenize.STRING and prev_type in _STATEMENT_START:
            j = i
            while j < len(tokens) and tokens[j].type == tokenize.STRING:
                j += 1
            if j == len(tokens) or tokens[j].type == tokenize.NEWLINE:
                i = j + 1  # a string statement does nothing; its NEWLINE goes with it
                continue
        # two words side by side keep a space between them ("not x" is not "notx")
        if out and tok.type in _WORDS and prev_type in _WORDS:
            out.append(" ")
        out.append("\n" if tok.type == tokenize.NEWLINE else tok.string)
        prev_type = tok.type
        i += 1
    return "".join(out)


def code_key(files: Iterable[Path], *extra: str) -> str:
    """A 16-hex-digit key of what ``files`` do (by name and behaviour), plus ``extra`` strings."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode() + b"\0" + behaviour_text(f.read_text()).encode() + b"\0")
    for e in extra:
        h.update(e.encode() + b"\0")
    return h.hexdigest()[:16]
