"""One HTTP request's work on the server's engine: admission, its events in an asyncio queue, and
the client's disconnection watched while they flow (torch-free, no web framework)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import constants as C
from .audio import AudioSource
from .engine import Ticket
from .errors import MdlEdgeError
from .options import GenerationOptions
from .pipeline import Request
from .segments import TimedSegment
from .wire import ApiError, api_error

if TYPE_CHECKING:
    from .server import ServerState

logger = logging.getLogger("mdl_edge")


@dataclass
class Job:
    """One request's work on the engine: events ``("text", piece)``, ``("segment", TimedSegment)``,
    ``("done", Result | list[TimedSegment])`` or ``("error", ApiError)`` arrive in ``events``."""

    state: ServerState
    loop: asyncio.AbstractEventLoop
    started: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tickets: list[Ticket] = field(default_factory=list)
    cancelled: bool = False
    first: float | None = None
    finished: bool = False
    checked: float = field(default_factory=time.monotonic)  # when the client was last seen connected

    def post(self, kind: str, payload: Any) -> None:
        if kind in ("text", "segment") and self.first is None:
            self.first = time.perf_counter()
            self.state.metrics.ttft.observe(self.first - self.started)
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        self.cancelled = True
        for t in self.tickets:
            t.cancel()

    def submit(self, request: Request) -> None:
        def done(ticket: Ticket) -> None:
            out = ticket.outcome
            if isinstance(out, MdlEdgeError):
                if ticket.cancelled:
                    self.state.metrics.cancelled.inc()
                self.post("error", api_error(out))
            else:
                self.state.metrics.answered(out)  # type: ignore[arg-type]
                self.post("done", out)
            self.end()

        self.tickets.append(self.state.engine.submit(request, on_text=lambda p: self.post("text", p), on_done=done))

    def segments(self, source: AudioSource, prompt: str, options: GenerationOptions, mode: str) -> None:
        """Answer a long recording segment by segment on a worker thread."""
        def work() -> None:
            done: list[TimedSegment] = []
            try:
                runner = lambda reqs: self.state.engine.runner(reqs, cancelled=lambda: self.cancelled)  # noqa: E731
                for seg in self.state.lm.segments(source, prompt, options, mode=mode, segmenting=self.state.options.segmenting,
                                                   sample_rate=C.SAMPLE_RATE if isinstance(source, np.ndarray) else None,
                                                   runner=runner):
                    done.append(seg)
                    self.state.metrics.generated_tokens.inc(len(seg.token_ids))
                    self.post("segment", seg)
                self.post("done", done)
            except MdlEdgeError as e:
                self.post("error", api_error(e))
            except Exception as e:  # never leave the client waiting
                logger.exception("transcription failed")
                self.post("error", ApiError(500, f"transcription failed: {e}", type="server_error"))
            finally:
                self.end()

        threading.Thread(target=work, name="mdl-edge-segments", daemon=True).start()

    def end(self) -> None:
        """Called once when the work ends (any thread): frees what the request held."""
        if self.finished:
            return
        self.finished = True
        self.state.release(time.perf_counter() - self.started)
        self.state.metrics.duration.observe(time.perf_counter() - self.started)


class ClientGone(Exception):
    """The client disconnected before its answer was ready (answered 499, which nobody reads)."""


async def next_event(job: Job, request: Any, every: float = 0.25) -> tuple[str, Any]:
    """The job's next event; cancels the job when the client has disconnected (looked at every
    ``every`` seconds, whether events flow or not)."""
    while True:
        now = time.monotonic()
        if now - job.checked >= every:
            job.checked = now
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone()
        try:
            return await asyncio.wait_for(job.events.get(), every)
        except asyncio.TimeoutError:
            continue


@contextmanager
def new_job(state: ServerState) -> Iterator[Job]:
    """Admit a request (503 when full) and open its job; a request that fails before its work is
    handed over releases its place at once."""
    state.admit()
    job = Job(state, asyncio.get_running_loop())
    try:
        yield job
    except BaseException:
        job.end()
        raise


async def first_event(job: Job, request: Any) -> tuple[str, Any]:
    """The first event: an error before any text is an ordinary HTTP error, not a stream."""
    kind, payload = await next_event(job, request)
    if kind == "error":
        raise payload
    return kind, payload


async def final_event(job: Job, request: Any, kind: str, payload: Any) -> Any:
    """Read the events up to the end; the final payload."""
    while kind != "done":
        kind, payload = await next_event(job, request)
        if kind == "error":
            raise payload
    return payload
