"""Continuous batching: several generations in one llama.cpp context, decoded together.

Decoding one sequence reads every weight of the decoder for each token; decoding several in one
``llama_decode`` reads them once per step for all of them. Each step here is one batch of
embedding rows: one row per running sequence (its last token's ``token_embd`` row, which gives
llama.cpp's own token lookup bit for bit), then, in the room left up to ``n_batch``, the next
piece of a newly admitted request's prompt (its text rows and audio embeddings), so a long
prefill never stalls the running sequences for more than one step. Every sequence has its own
sampler chain, stop ids and new-token limit; a finished or cancelled one frees its KV cells at
once and the next waiting request takes its slot. A request whose prompt starts the way a running
one's does (the same text; the same clip's embeddings, for several questions about one clip)
copies those KV cells (``llama_memory_seq_cp``) instead of evaluating them again.

The KV cache is one unified pool of cells: a request is admitted when its prompt plus its
new-token limit fits beside the running ones; with the automatic context size the pool grows
(between requests, when nothing runs) up to ``slots`` times the longest request, and a request
longer than the model's training length is refused alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .decoder import AUTO_CTX_STEP, DecodeResult, LlamaDecoder, context_steps
from .prompt import Segment, same_segment
from .sampling import SequenceStep
from .errors import ConfigError, ContextLengthError, MdlEdgeError, OptionError
from .options import DEFAULT_MAX_NEW_TOKENS, SamplingOptions, whole_number

logger = logging.getLogger("mdl_edge")

# A shared prompt start shorter than this is evaluated again rather than copied.
MIN_SHARED_PREFIX = 4
MAX_SLOTS = 64  # sequences in one context (llama.cpp allows 256; each costs its KV cells and a sampler)


@dataclass(frozen=True)
class DecodeRequest:
    """One generation for :func:`generate_many`; ``key`` is the caller's handle for it.
    ``stop_strings`` end the answer before them; ``cancelled`` (called from the decoding thread
    before each step, so it must be cheap) stops the request when it returns True, as
    :meth:`BatchRun.cancel` does."""

    segments: tuple[Segment, ...]
    key: Any = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingOptions = SamplingOptions()
    stop_strings: tuple[str, ...] = ()
    cancelled: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        whole_number("max_new_tokens", self.max_new_tokens)
        if not self.segments or sum(len(s) for s in self.segments) == 0:
            raise ConfigError("empty prompt")

    @property
    def n_prompt(self) -> int:
        return sum(len(s) for s in self.segments)


@dataclass(frozen=True)
class Failed:
    """A request that failed before it reached the decoder (e.g. its audio could not be read):
    passed through :func:`generate_many` as its error event, in turn."""

    key: Any
    error: BaseException


#: Yielded by a request iterable that has nothing ready yet (requests prepared by another thread):
#: running sequences go on decoding meanwhile.
NOT_READY = object()


@dataclass(frozen=True)
class DecodeEvent:
    """What happened to one request: a new text piece, or its end (``result``, or ``error``)."""

    key: Any
    text: str = ""
    result: DecodeResult | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(eq=False)
class _Seq:
    req: DecodeRequest
    seq_id: int
    rows: np.ndarray  # the prompt as embedding rows [n_prompt, n_embd]
    step: SequenceStep  # sampling, stop rules and text of the answer
    n_done: int = 0  # prompt positions in the KV cache
    n_shared: int = 0  # of them copied from another sequence
    t_start: float = 0.0
    t_prefilled: float = 0.0
    share_from: "_Seq | None" = None  # waits for this sequence to evaluate the shared prompt start
    n_share: int = 0  # positions to copy from it

    @property
    def n_past(self) -> int:
        return self.n_done + len(self.step.tokens)

    @property
    def prefilling(self) -> bool:
        return self.n_done < self.rows.shape[0]

    @property
    def need(self) -> int:
        return self.req.n_prompt + self.req.max_new_tokens + 1


class BatchRun:
    """The events of :func:`generate_many` as they happen; :meth:`cancel` stops one request
    (it ends with an error event, its slot goes to the next request)."""

    def __init__(self, dec: LlamaDecoder, requests: Iterable[Any], slots: int) -> None:
        if whole_number("parallel", slots) > MAX_SLOTS:
            raise OptionError("parallel", f"must be at most {MAX_SLOTS} sequences, got {slots}")
        self._dec = dec
        self._requests = iter(requests)
        self._slots = slots
        self._cancel: list[Any] = []
        self._gen = self._run()
        #: steps with decode rows only (no prompt pieces): how many, their rows, their seconds
        self.stats = {"decode_steps": 0, "decode_rows": 0, "decode_seconds": 0.0, "steps": 0}

    def __iter__(self) -> "BatchRun":
        return self

    def __next__(self) -> DecodeEvent:
        return next(self._gen)

    def cancel(self, key: Any) -> None:
        """Stop the request with this key (the same object, or an equal one of the same type)
        before its next token (no-op once it has ended)."""
        self._cancel.append(key)

    def _cancelled(self, key: Any) -> bool:
        for k in self._cancel:
            try:
                if k is key or (type(k) is type(key) and bool(k == key)):
                    self._cancel.remove(k)
                    return True
            except (TypeError, ValueError):  # keys whose == is not a plain bool (arrays)
                continue
        return False

    def close(self) -> None:
        """Stop every request and free the context for other calls."""
        self._gen.close()

    def __enter__(self) -> "BatchRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> Iterator[DecodeEvent]:
        dec = self._dec
        with dec.exclusive():
            self._prepare()
            try:
                yield from self._loop()
            finally:
                for seq in self._running:
                    seq.step.close()
                dec.clear()

    def _prepare(self) -> None:
        dec = self._dec
        if dec.n_seq < self._slots or (dec.auto_ctx and dec.n_ctx < self._slots * AUTO_CTX_STEP):
            size = max(dec.n_ctx, self._slots * AUTO_CTX_STEP) if dec.auto_ctx else dec.n_ctx
            dec.resize(size, self._slots)
        else:
            dec.clear()
        self._running: list[_Seq] = []
        self._free = list(range(self._slots))

    def _loop(self) -> Iterator[DecodeEvent]:
        waiting: deque[DecodeRequest] = deque()
        exhausted = False
        while True:
            # One new request per step while others run: pulling one may mean encoding its clip,
            # and a request that is ready starts at the next step instead of waiting for every
            # other arrival to be encoded (lower time to first token, no convoy of requests that
            # arrived together and would then finish together and arrive together again).
            pulled = False
            while not exhausted and len(waiting) < len(self._free) + 1 and not (pulled and (self._running or waiting)):
                item = next(self._requests, None)
                if item is None:
                    exhausted = True
                elif item is NOT_READY:
                    if self._running or waiting:
                        break
                    time.sleep(0.002)  # nothing to decode: wait for the producer
                elif isinstance(item, Failed):
                    yield DecodeEvent(item.key, error=item.error)
                else:
                    waiting.append(item)
                    pulled = True
            yield from self._admit(waiting)
            yield from self._drop_cancelled()
            if not self._running:
                if exhausted and not waiting:
                    return
                continue
            plan = self._plan()
            t = time.perf_counter()
            self._decode(plan)
            events = list(self._sample(plan))
            self.stats["steps"] += 1
            if all(start < 0 for _, start, _, _ in plan):
                self.stats["decode_steps"] += 1
                self.stats["decode_rows"] += len(plan)
                self.stats["decode_seconds"] += time.perf_counter() - t
            yield from events

    def _admit(self, waiting: deque[DecodeRequest]) -> Iterator[DecodeEvent]:
        dec = self._dec
        limit = dec.max_positions
        while self._free and waiting:
            req = waiting[0]
            if req.cancelled is not None and req.cancelled():
                waiting.popleft()
                yield DecodeEvent(req.key, error=MdlEdgeError("cancelled"))
                continue
            need = req.n_prompt + req.max_new_tokens + 1
            if need > limit:
                waiting.popleft()
                yield DecodeEvent(req.key, error=ContextLengthError(
                    f"this request needs {need} positions but the decoder holds {limit} per sequence; shorten the audio or max_new_tokens"))
                continue
            used = sum(s.need for s in self._running)
            if used + need > dec.n_ctx:
                if self._running or not dec.auto_ctx:
                    return  # wait for cells to free
                size = context_steps(need) * self._slots
                logger.info("growing the decoder context from %d to %d cells", dec.n_ctx, size)
                dec.resize(size, self._slots)
            waiting.popleft()
            try:
                rows = dec.prompt_rows(req.segments)
            except MdlEdgeError as e:
                yield DecodeEvent(req.key, error=e)
                continue
            step = SequenceStep(dec, req.sampling, req.stop_ids, req.stop_strings, req.max_new_tokens)
            seq = _Seq(req, self._free.pop(0), rows, step, t_start=time.perf_counter())
            self._share_prefix(seq)
            self._running.append(seq)

    def _share_prefix(self, seq: _Seq) -> None:
        """Find the running sequence whose prompt starts the same way for longest (text, and the
        same clip's embeddings: several questions about one clip): its KV cells for that start are
        copied (now, or as soon as it has evaluated them) instead of evaluated again. The last
        prompt position is always evaluated: its logits give the first token."""
        best, n_best = None, MIN_SHARED_PREFIX - 1
        for other in self._running:  # one that waits on a third to share is fine: it is copied once it has them
            n = min(_common_prefix(seq.req.segments, other.req.segments), seq.req.n_prompt - 1)
            if n > n_best:
                best, n_best = other, n
        if best is not None:
            seq.share_from, seq.n_share = best, n_best
            self._resolve_share(seq)

    def _resolve_share(self, seq: _Seq) -> None:
        src = seq.share_from
        if src is None:
            return
        n = seq.n_share
        if src not in self._running:  # it ended before evaluating the shared start: evaluate it here
            seq.share_from = None
        elif src.n_done >= n:
            self._dec.copy_cells(src.seq_id, seq.seq_id, n)
            seq.n_done = seq.n_shared = n
            seq.share_from = None

    def _drop_cancelled(self) -> Iterator[DecodeEvent]:
        def cancelled(s: _Seq) -> bool:
            return (s.req.cancelled is not None and s.req.cancelled()) or (bool(self._cancel) and self._cancelled(s.req.key))

        for seq in [s for s in self._running if cancelled(s)]:
            self._finish(seq)
            yield DecodeEvent(seq.req.key, error=MdlEdgeError("cancelled"))

    def _plan(self) -> list[tuple[_Seq, int, int, bool]]:
        """This step's rows: ``(sequence, first row, count, wants logits)`` per sequence; one
        row for each sequence that is generating, then prompt pieces in the room left."""
        n_batch = self._dec.n_batch
        for s in self._running:
            self._resolve_share(s)
        plan = [(s, -1, 1, True) for s in self._running if not s.prefilling]
        room = n_batch - len(plan)
        for s in self._running:
            if s.prefilling and s.share_from is None and room > 0:
                k = min(room, s.rows.shape[0] - s.n_done)
                plan.append((s, s.n_done, k, s.n_done + k == s.rows.shape[0]))
                room -= k
        return plan

    def _decode(self, plan: list[tuple[_Seq, int, int, bool]]) -> None:
        dec = self._dec
        last = [s.step.tokens[-1] for s, start, _, _ in plan if start < 0]
        token_rows = dec.token_rows(last) if last else None
        n = sum(k for _, _, k, _ in plan)
        buf = np.empty((n, dec.n_embd), np.float32)
        positions: list[int] = []
        seq_ids: list[int] = []
        want: list[bool] = []
        i = j = 0
        for s, start, k, logits in plan:
            if start < 0:
                buf[i] = token_rows[j]  # type: ignore[index]
                pos0 = s.n_past - 1
                j += 1
            else:
                buf[i : i + k] = s.rows[start : start + k]
                pos0 = start
            positions += range(pos0, pos0 + k)
            seq_ids += [s.seq_id] * k
            want += [logits and r == k - 1 for r in range(k)]
            i += k
        dec.decode_rows(buf, positions, seq_ids, want)

    def _sample(self, plan: list[tuple[_Seq, int, int, bool]]) -> Iterator[DecodeEvent]:
        dec = self._dec
        row = 0
        for s, start, k, logits in plan:
            row += k
            if start >= 0:
                s.n_done += k
                if not logits:
                    continue
                s.t_prefilled = time.perf_counter()
            for piece in s.step.take(dec.sample(s.step.sampler, row - 1)):
                yield DecodeEvent(s.req.key, text=piece)
            if s.step.reason is not None:
                self._finish(s)
                now = time.perf_counter()
                yield DecodeEvent(s.req.key, result=DecodeResult(
                    "".join(s.step.text), tuple(s.step.tokens), s.step.reason, s.req.n_prompt,
                    s.req.n_prompt - s.n_shared, s.t_prefilled - s.t_start, now - s.t_prefilled))

    def _finish(self, seq: _Seq) -> None:
        self._dec.drop_sequence(seq.seq_id)
        seq.step.close()
        self._running.remove(seq)
        self._free.append(seq.seq_id)
        self._free.sort()


def generate_many(dec: LlamaDecoder, requests: Iterable[Any], *, slots: int = 4) -> BatchRun:
    """Decode ``requests`` (:class:`DecodeRequest` or :class:`Failed` items, read lazily, one more
    than there are free slots; an item may be :data:`NOT_READY`) up to ``slots`` at a time in
    ``dec``'s context; iterate the result for :class:`DecodeEvent` s as they happen."""
    return BatchRun(dec, requests, slots)


def _common_prefix(a: Sequence[Segment], b: Sequence[Segment]) -> int:
    """Prompt positions two prompts share from their start: text token by token, audio only as
    the same clip's embeddings whole."""
    n = 0
    for x, y in zip(a, b):
        if x.embeddings is None and y.embeddings is None:
            k = 0
            for p, q in zip(x.tokens, y.tokens):
                if p != q:
                    break
                k += 1
            n += k
            if k < len(x) or k < len(y):
                return n
        elif x.embeddings is not None and y.embeddings is not None and same_segment(x, y):
            n += len(x)
        else:
            return n
    return n
