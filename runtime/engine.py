"""A long-lived answerer for requests that arrive at any time (a server's), torch-free.

One thread owns the decoder and runs :meth:`AudioLM.run` over a live queue: requests that
overlap in time decode together in the one llama.cpp context (continuous batching), a new one
joins at the next step, and a finished or cancelled one frees its slot at once. Callers on other
threads :meth:`Engine.submit` a :class:`~mdl_edge.runtime.pipeline.Request` and get a
:class:`Ticket`: its text pieces and its end arrive through callbacks run on the engine thread
(keep them short: hand the data to your own thread or event loop), and ``ticket.cancel()``
stops it before its next token.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

from .batching import NOT_READY
from .errors import MdlEdgeError
from .options import whole_number
from .pipeline import AudioLM, Request, Result

logger = logging.getLogger("mdl_edge")

_STOP = object()


@dataclass(eq=False)
class Ticket:
    """One submitted request. ``outcome`` is its :class:`Result` or error once ``finished``."""

    request: Request
    on_text: Callable[[str], None] | None = None
    on_done: Callable[["Ticket"], None] | None = None
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_text: float | None = None  # perf_counter time of its first text piece
    outcome: Result | MdlEdgeError | None = None
    _cancelled: bool = False
    _finished: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop it: before its next token if it is decoding, before any work if it waits."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Result | MdlEdgeError | None:
        """Block until it has finished (or ``timeout`` seconds); its outcome, None on timeout."""
        self._finished.wait(timeout)
        return self.outcome


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot: requests waiting in the queue, requests the decoder has taken (being
    encoded, prefilled or decoded), and its slots."""

    queued: int
    active: int
    slots: int
    finished: int
    failed: int


class Engine:
    """Answers :class:`Request` s submitted from any thread, ``parallel`` decoded together by
    ``lm``'s decoder (which the engine's thread holds for its lifetime: do not call ``lm``'s
    generation methods while it runs; use :meth:`submit` and :meth:`runner`)."""

    def __init__(self, lm: AudioLM, *, parallel: int = 4) -> None:
        self.lm = lm
        self.parallel = whole_number("parallel", parallel)
        self._queue: queue.Queue = queue.Queue()
        self._handed: dict[int, Ticket] = {}  # taken by the decoder, not yet finished (engine thread only)
        self._ids = itertools.count(1)
        self._finished = 0
        self._failed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._main, name="mdl-edge-engine", daemon=True)
        self._thread.start()

    # -- callers ------------------------------------------------------------------------------
    def submit(self, request: Request, *, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Queue ``request``; ``on_text(piece)`` and ``on_done(ticket)`` are called on the engine
        thread as its text arrives and when it ends (with a result, an error, or cancelled)."""
        if self._closed:
            raise MdlEdgeError("the engine is closed")
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a Request, got {type(request).__name__}")
        ticket = Ticket(request, on_text, on_done, next(self._ids))
        self._queue.put(ticket)
        return ticket

    def runner(self, requests: Iterable[Request], *, ahead: int | None = None,
               cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[Request, Result | MdlEdgeError]]:
        """A :data:`~mdl_edge.runtime.pipeline.Runner` on this engine (for
        :meth:`AudioLM.segments`): submits ``requests`` at most ``ahead`` (default: the slots) in
        flight, yields ``(request, outcome)`` as each finishes. Closing it, or ``cancelled()``
        turning True, cancels what it has in flight."""
        ahead = whole_number("ahead", ahead if ahead is not None else self.parallel)
        done: queue.Queue = queue.Queue()
        pending: list[Ticket] = []
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < ahead:
                    req = next(source, None)
                    if req is None:
                        exhausted = True
                    else:
                        pending.append(self.submit(req, on_done=done.put))
                if not pending:
                    return
                try:
                    ticket = done.get(timeout=0.1)
                except queue.Empty:
                    if cancelled is not None and cancelled():
                        raise MdlEdgeError("cancelled") from None
                    continue
                pending.remove(ticket)
                assert ticket.outcome is not None
                yield ticket.request, ticket.outcome
        finally:
            for t in pending:
                t.cancel()

    def status(self) -> EngineStatus:
        return EngineStatus(self._queue.qsize(), len(self._handed), self.parallel, self._finished, self._failed)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what waits or runs and stop the engine thread (the decoder is free again)."""
        if self._closed:
            return
        self._closed = True
        for t in list(self._handed.values()):
            t.cancel()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the engine thread ----------------------------------------------------------------------
    def _live(self) -> Iterator[object]:
        """The decoder's request source: queued tickets as they come; :data:`NOT_READY` while
        the decoder has work and nothing new waits; blocks while it has none."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self._handed:
                    yield NOT_READY
                    continue
                item = self._queue.get()
            if item is _STOP:
                return
            ticket: Ticket = item
            if ticket.cancelled:
                self._finish(ticket, MdlEdgeError("cancelled"))
                continue
            self._handed[ticket.id] = ticket
            yield replace(ticket.request, tag=ticket.id, on_text=lambda piece, t=ticket: self._text(t, piece),
                          cancelled=lambda t=ticket: t.cancelled)

    def _text(self, ticket: Ticket, piece: str) -> None:
        if ticket.first_text is None:
            ticket.first_text = time.perf_counter()
        if ticket.on_text is not None:
            try:
                ticket.on_text(piece)
            except Exception:  # a caller's callback must not stop the engine
                logger.exception("on_text callback of request %d failed", ticket.id)

    def _finish(self, ticket: Ticket, outcome: Result | MdlEdgeError) -> None:
        self._handed.pop(ticket.id, None)
        ticket.outcome = outcome
        if isinstance(outcome, MdlEdgeError):
            self._failed += 1
        else:
            self._finished += 1
        ticket._finished.set()
        if ticket.on_done is not None:
            try:
                ticket.on_done(ticket)
            except Exception:  # a caller's callback must not stop the engine
                logger.exception("on_done callback of request %d failed", ticket.id)

    def _main(self) -> None:
        while not self._closed:
            try:
                for req, outcome in self.lm.run(self._live(), parallel=self.parallel):
                    ticket = self._handed.get(req.tag)
                    if ticket is not None:
                        self._finish(ticket, outcome)
                return  # the source ended: closed
            except Exception as e:  # the decoder failed mid-step: fail what it held, start again
                logger.exception("the decoding loop failed; failing %d request(s) and restarting it", len(self._handed))
                err = e if isinstance(e, MdlEdgeError) else MdlEdgeError(f"decoding failed: {e}")
                for ticket in list(self._handed.values()):
                    self._finish(ticket, err)
