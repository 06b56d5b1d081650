"""The per-sequence step of generation, shared by the single stream and the batched path:
sampled token -> stop id, text piece (UTF-8 completed across tokens, stop strings held back),
stop string or token limit (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .options import SamplingOptions

if TYPE_CHECKING:
    from .decoder import LlamaDecoder


class Utf8Pieces:
    """Joins token byte pieces into text, holding back an incomplete UTF-8 sequence."""

    def __init__(self) -> None:
        self._pending = b""

    def push(self, piece: bytes) -> str:
        data = self._pending + piece
        # keep up to 3 trailing bytes that may start a multi-byte character
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


class TextPieces:
    """An answer's text as it is generated: complete UTF-8 (see :class:`Utf8Pieces`), ended at
    the first of the caller's stop strings. Text that could be the start of a stop string is held
    back until the next piece tells; once a stop string appears, :attr:`stopped` is set and the
    answer ends before it (the stop string is not part of it, as in OpenAI's API)."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._utf8 = Utf8Pieces()
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """The text that is now final, from one more token's bytes."""
        return self._cut(self._held + self._utf8.push(piece), final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        return self._cut(self._held + self._utf8.flush(), final=True)

    def _cut(self, text: str, final: bool) -> str:
        self._held = ""
        if not self._stop or self.stopped:
            return "" if self.stopped else text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        if not final:
            keep = max((k for s in self._stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)
            if keep:
                self._held = text[-keep:]
                return text[:-keep]
        return text


class SequenceStep:
    """One answer as it is generated, the per-token step the single stream and the batched path
    share: a sampled token -> a stop id ends it; else its text piece (a UTF-8 character split
    across tokens waits for its last byte, text that may begin a stop string is held back) -> a
    stop string or the token limit ends it. Owns its llama.cpp sampler until :meth:`close`."""

    def __init__(self, dec: "LlamaDecoder", sampling: SamplingOptions, stop_ids: Sequence[int], stop_strings: Sequence[str],
                 max_new_tokens: int) -> None:
        self._dec = dec
        self.sampler = dec.new_sampler(sampling)
        self.stop_ids = frozenset(stop_ids)
        self.pieces = TextPieces(stop_strings)
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.reason: str | None = None  # set when the answer ends: stop_token, stop_string, max_new_tokens

    def take(self, tok: int) -> list[str]:
        """Add the sampled ``tok``; the text pieces it completes (the held-back tail too, when
        the answer ends here)."""
        out = []
        if tok in self.stop_ids:
            self.reason = "stop_token"
        else:
            self.tokens.append(tok)
            piece = self.pieces.push(self._dec.piece(tok))
            if piece:
                out.append(piece)
            if self.pieces.stopped:
                self.reason = "stop_string"
            elif len(self.tokens) >= self.max_new_tokens:
                self.reason = "max_new_tokens"
        if self.reason is not None:
            tail = self.pieces.flush()
            if tail:
                out.append(tail)
        self.text += out
        return out

    def close(self) -> None:
        """Give the sampler back (idempotent)."""
        if self.sampler is not None:
            self._dec.free_sampler(self.sampler)
            self.sampler = None
