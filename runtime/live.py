"""Live captions and transcription: audio pushed as it arrives -> partial and final text (torch-free).

MiDashengLM is not a streaming model, so live mode is built around it:

- **transcription**: WebRTC's VAD over 30 ms frames opens an utterance after ``speech_start``
  seconds of speech (keeping ``prefix_padding`` of audio before it) and closes it after
  ``silence`` seconds without speech, or cuts it at ``max_utterance``. Each utterance gets one
  final transcript.
- **captions**: fixed windows of ``window`` seconds every ``hop`` seconds, each captioned when it
  is full (and the unseen tail at the end of the stream).

While an utterance (or the oldest caption window) is open, a *partial* result re-decodes it at
most every ``partial_every`` seconds of audio, and never more often than keeps partials within
``partial_budget`` of the machine's time (a partial that took 0.2 s waits 0.8 s at 0.25). Audio
is turned into the log-mel as it arrives and encoded chunk by chunk: the encoder's 1008-frame
chunks are independent, so a finished chunk's features are reused by every later partial and
by the final (top_db clamps relative to the clip's peak: a chunk is reused while none of its
frames lies below the peak so far minus top_db, so the result is the offline encoder's exactly).

Threads: :meth:`LiveSession.push` (the caller) converts and queues the audio; one worker per
session runs voice activity, the log-mel and the encoder; the decoding is the shared
:class:`~mdl_edge.runtime.engine.Engine`'s, so live streams and other requests share its
continuous batching. The queue holds at most ``max_buffered`` seconds: beyond that a push waits
(back-pressure) or, with ``drop=True``, the block is dropped and counted, and the stream's clock
skips over it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from . import constants as C
from .audio import BlockConverter
from .engine import Engine, Ticket
from .errors import MdlEdgeError, OptionError
from .live_audio import OpenSegment
from .options import GenerationOptions
from .pipeline import AudioLM, Embedded, Request
from .prompt import CAPTION_PROMPT, transcribe_prompt
from .segments import VAD_FRAME, VoiceActivity

logger = logging.getLogger("mdl_edge")

TASKS = ("transcribe", "caption")
SR = C.SAMPLE_RATE


def _seconds(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise OptionError(name, f"must be between {lo:g} and {hi:g} seconds, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LiveOptions:
    """How a live stream is cut and answered. ``task``: ``"transcribe"`` (utterances cut by
    voice activity) or ``"caption"`` (fixed windows). ``partial_every`` 0 turns partials off."""

    task: str = "transcribe"
    language: str | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    # transcription: voice activity (``vad=False``: utterances end only at :meth:`LiveSession.commit`
    # or ``max_utterance``, as OpenAI's Realtime API without turn detection)
    vad: bool = True
    aggressiveness: int = 2
    noise_gate_db: float = 6.0  # a frame is speech only this far above the background; 0: off
    speech_start: float = 0.09
    silence: float = 0.5
    prefix_padding: float = 0.3
    max_utterance: float = 30.0
    # captions
    window: float = 10.0
    hop: float = 5.0
    # partial results
    partial_every: float = 0.5
    partial_budget: float = 0.25
    # flow
    max_buffered: float = 10.0
    drop: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise OptionError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.generation, GenerationOptions):
            raise OptionError("generation", f"must be a GenerationOptions, got {type(self.generation).__name__}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise OptionError("aggressiveness", f"must be 0, 1, 2 or 3, got {self.aggressiveness!r}")
        if isinstance(self.noise_gate_db, bool) or not isinstance(self.noise_gate_db, (int, float)) or not 0 <= self.noise_gate_db <= 30:
            raise OptionError("noise_gate_db", f"must be between 0 and 30 dB, got {self.noise_gate_db!r}")
        _seconds("speech_start", self.speech_start, 0.03, 2.0)
        _seconds("silence", self.silence, 0.09, 10.0)
        _seconds("prefix_padding", self.prefix_padding, 0.0, 5.0)
        _seconds("max_utterance", self.max_utterance, 1.0, 600.0)
        _seconds("window", self.window, 1.0, 600.0)
        _seconds("hop", self.hop, 0.5, 600.0)
        if self.hop > self.window:
            raise OptionError("hop", f"must not exceed the window ({self.window:g} s), got {self.hop:g}")
        if self.partial_every != 0:
            _seconds("partial_every", self.partial_every, 0.1, 600.0)
        if isinstance(self.partial_budget, bool) or not isinstance(self.partial_budget, (int, float)) or not 0.01 <= self.partial_budget <= 1.0:
            raise OptionError("partial_budget", f"must be between 0.01 and 1, got {self.partial_budget!r}")
        _seconds("max_buffered", self.max_buffered, 0.1, 600.0)

    @property
    def prompt(self) -> str:
        return transcribe_prompt(self.language) if self.task == "transcribe" else CAPTION_PROMPT


@dataclass(frozen=True)
class LiveEvent:
    """Something that happened in a live stream, timed in the stream's clock (seconds of audio
    pushed since it began). ``type``: ``speech_started`` / ``speech_stopped`` (transcription),
    ``partial`` (the open utterance or window so far: replaces the previous partial of ``item``),
    ``final_delta`` (a piece of the final's text as it is decoded), ``final`` (one per utterance or
    window, in ``item`` order), ``dropped`` (audio the machine
    could not keep up with: ``start``-``end`` were skipped), ``error`` (``text`` says what)."""

    type: str
    item: int
    start: float
    end: float
    text: str = ""
    audio_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class LiveStats:
    """A live stream's counters: audio taken and dropped, results, the worker's busy time (voice
    activity, log-mel, encoder) and the decoder's time on its results (prefill and decode of
    partials and finals; steps shared with other requests count in full for each)."""

    audio_seconds: float
    dropped_blocks: int
    dropped_seconds: float
    partials: int
    finals: int
    worker_seconds: float
    queued_seconds: float
    decoder_seconds: float = 0.0

    @property
    def real_time_factor(self) -> float:
        """Compute time (worker and decoder) per second of audio."""
        return (self.worker_seconds + self.decoder_seconds) / self.audio_seconds if self.audio_seconds else 0.0


class LiveSession:
    """One live stream: :meth:`push` audio blocks as they arrive, read :class:`LiveEvent` s from
    ``on_event`` (called on the session's and the engine's threads: keep it short) or from
    :meth:`events`; :meth:`finish` at the end of the stream (closes what is open and waits for
    its finals), :meth:`cancel` to stop at once.

    ``engine``: a shared :class:`Engine`, or an :class:`AudioLM` (the session then runs an engine
    of its own and closes it at the end). ``sample_rate``: of the pushed blocks (any rate; mono
    ``[n]`` or ``[n, channels]``, integer or float samples)."""

    def __init__(self, engine: Engine | AudioLM, options: LiveOptions = LiveOptions(), *, sample_rate: int = SR,
                 on_event: Callable[[LiveEvent], None] | None = None, name: str = "live") -> None:
        if not isinstance(options, LiveOptions):
            raise TypeError(f"options must be a LiveOptions, got {type(options).__name__}")
        self._own_engine = isinstance(engine, AudioLM)
        self.engine = Engine(engine, parallel=2) if isinstance(engine, AudioLM) else engine
        self.lm = self.engine.lm
        self.options, self.name = options, name
        self._convert = BlockConverter(sample_rate, name)
        self._on_event = on_event
        self._events: queue.Queue = queue.Queue()
        self._emit_lock = threading.Lock()
        # the inbox: 16 kHz blocks, ("gap", n) for dropped audio, and control words
        self._inbox: deque = deque()
        self._inbox_samples = 0
        self._cond = threading.Condition()
        self._limit = int(options.max_buffered * SR)
        self._pushed = 0
        self._dropped_blocks = 0
        self._dropped_samples = 0
        self._worker_s = 0.0
        self._decoder_s = 0.0
        self._partials = self._finals = 0
        # the worker's state
        self._clock = 0  # samples processed
        self._items = itertools.count()
        self._vad = VoiceActivity(options.aggressiveness) if options.task == "transcribe" and options.vad else None
        self._frame_rest = np.zeros(0, np.float32)
        self._energies: deque[float] = deque(maxlen=66)  # the last 2 s of 30 ms frame energies
        self._gate = 10 ** (options.noise_gate_db / 10)
        self._ring: deque[np.ndarray] = deque()  # recent frames while no utterance is open
        self._speech_run = 0
        self._silence_run = 0
        self._last_speech_end = 0
        self._open: list[OpenSegment] = []  # transcription: at most one; captions: the windows being filled
        self._next_window = 0
        self._heard_until = 0  # stream sample up to which a final has been asked for
        # results
        self._results_lock = threading.Lock()
        self._in_flight: dict[int, Ticket] = {}
        self._partial_ticket: Ticket | None = None
        self._partial_cost = 0.0
        self._next_partial_wall = 0.0
        self._pending_finals = 0
        self._done_finals: dict[int, LiveEvent] = {}
        self._final_order: deque[int] = deque()  # items whose finals are awaited, in order
        self._finals_idle = threading.Condition(self._results_lock)
        self._closed = False
        self._ended = threading.Event()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._main, name=f"mdl-edge-live-{name}", daemon=True)
        self._worker.start()

    # -- callers ------------------------------------------------------------------------------
    def push(self, samples: np.ndarray, *, timeout: float | None = None) -> bool:
        """Add a block of audio. Returns False when the block was dropped (``drop=True`` and
        ``max_buffered`` seconds already queued). Without ``drop``, waits for room (at most
        ``timeout`` seconds, then raises :class:`MdlEdgeError`)."""
        if self._closed:
            raise MdlEdgeError(f"{self.name}: the live stream is finished; open a new one")
        if self._error is not None:
            raise MdlEdgeError(f"{self.name}: the live stream failed: {self._error}") from self._error
        block = self._convert(samples)
        return self._put(block, timeout)

    def _put(self, block: np.ndarray, timeout: float | None) -> bool:
        n = block.size
        with self._cond:
            self._pushed += n
            if self._inbox_samples + n > self._limit and self._inbox_samples > 0:
                if self.options.drop:
                    self._dropped_blocks += 1
                    self._dropped_samples += n
                    self._inbox.append(("gap", n))
                    self._cond.notify_all()
                    logger.warning("%s: the machine is not keeping up; dropped %.2f s of audio (%d block(s) so far)",
                                   self.name, n / SR, self._dropped_blocks)
                    return False
                if not self._cond.wait_for(lambda: self._inbox_samples + n <= self._limit or self._error is not None
                                           or self._ended.is_set(), timeout):
                    raise MdlEdgeError(f"{self.name}: no room for more audio after {timeout} s (the stream is not being processed)")
                if self._error is not None or self._ended.is_set():
                    raise MdlEdgeError(f"{self.name}: the live stream stopped")
            self._inbox.append(block)
            self._inbox_samples += n
            self._cond.notify_all()
        return True

    def _control(self, word: str) -> None:
        with self._cond:
            self._inbox.append(word)
            self._cond.notify_all()

    def commit(self) -> None:
        """Close the open utterance now (its final follows), as a pause would. It holds every
        sample pushed before the commit, the resampler's held-back tail included."""
        if not self._closed:
            tail = self._convert.cut()
            if tail.size:
                self._put(tail, None)
        self._control("commit")

    def clear(self) -> None:
        """Forget the open utterance's audio (no final for it), the resampler's held-back tail
        included, so none of it opens the next utterance."""
        if not self._closed:
            self._convert.cut()
        self._control("clear")

    def finish(self, timeout: float | None = None) -> None:
        """End of the stream: close what is open, wait for every final, stop the session."""
        if not self._closed:
            self._closed = True
            tail = self._convert.flush()
            if tail.size:
                self._put(tail, None)
            self._control("end")
        if not self._ended.wait(timeout):
            raise MdlEdgeError(f"{self.name}: the live stream did not finish within {timeout} s")
        if self._own_engine:
            self.engine.close()

    def cancel(self) -> None:
        """Stop at once: queued audio and results in flight are dropped."""
        self._closed = True
        with self._cond:
            self._inbox.clear()
            self._inbox_samples = 0
            self._inbox.append("cancel")
            self._cond.notify_all()
        with self._results_lock:
            for t in self._in_flight.values():
                t.cancel()
        self._ended.wait(10.0)
        if self._own_engine:
            self.engine.close()

    def events(self, timeout: float | None = None) -> Iterator[LiveEvent]:
        """The events as they come (when no ``on_event`` was given), until the session ends."""
        if self._on_event is not None:
            raise MdlEdgeError("this session hands its events to on_event")
        while True:
            try:
                ev = self._events.get(timeout=0.1)
            except queue.Empty:
                if self._ended.is_set() and self._events.empty():
                    return
                continue
            yield ev

    @property
    def stats(self) -> LiveStats:
        with self._cond:
            queued = self._inbox_samples
        return LiveStats(self._pushed / SR, self._dropped_blocks, self._dropped_samples / SR, self._partials, self._finals,
                         self._worker_s, queued / SR, self._decoder_s)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.cancel()

    # -- events -------------------------------------------------------------------------------
    def _count_decoder(self, t: Ticket) -> None:
        out = t.outcome
        if out is not None and not isinstance(out, MdlEdgeError):
            with self._results_lock:
                self._decoder_s += out.timings.get("prefill", 0.0) + out.timings.get("decode", 0.0)

    def _emit(self, ev: LiveEvent) -> None:
        with self._emit_lock:
            if ev.type == "partial":
                self._partials += 1
            elif ev.type == "final":
                self._finals += 1
            if self._on_event is None:
                self._events.put(ev)
                return
            try:
                self._on_event(ev)
            except Exception:  # a caller's callback must not stop the stream
                logger.exception("%s: on_event failed", self.name)

    # -- the worker ---------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._inbox))
                    item = self._inbox.popleft()
                    if isinstance(item, np.ndarray):
                        self._inbox_samples -= item.size
                    self._cond.notify_all()
                t0 = time.perf_counter()
                if isinstance(item, np.ndarray):
                    self._audio(item)
                elif isinstance(item, tuple):  # ("gap", n): audio dropped
                    self._close_all()
                    self._emit(LiveEvent("dropped", -1, self._clock / SR, (self._clock + item[1]) / SR))
                    self._clock += item[1]
                    self._next_window = self._clock  # caption windows start again after the gap
                elif item == "commit":
                    self._close_all()
                elif item == "clear":
                    self._open.clear()
                    self._ring.clear()
                    self._speech_run = 0
                elif item == "cancel":
                    return
                elif item == "end":
                    self._close_all()
                    self._worker_s += time.perf_counter() - t0
                    with self._results_lock:
                        self._finals_idle.wait_for(lambda: not self._final_order)
                    return
                self._worker_s += time.perf_counter() - t0
        except BaseException as e:  # reported, and the stream stops
            logger.exception("%s: the live stream failed", self.name)
            self._error = e
            self._emit(LiveEvent("error", -1, self._clock / SR, self._clock / SR, f"{self.name}: {e}"))
        finally:
            self._ended.set()
            with self._cond:
                self._cond.notify_all()

    def _audio(self, block: np.ndarray) -> None:
        if self.options.task == "caption":
            self._caption_audio(block)
        else:
            self._speech_audio(block)
        self._maybe_partial()

    # transcription ---------------------------------------------------------------------------
    def _speech_audio(self, block: np.ndarray) -> None:
        o = self.options
        if not o.vad:
            self._unsegmented_audio(block)
            return
        buf = np.concatenate([self._frame_rest, block]) if self._frame_rest.size else block
        n = buf.size // VAD_FRAME
        self._frame_rest = buf[n * VAD_FRAME :]
        if n == 0:
            return
        frames = buf[: n * VAD_FRAME]
        speech = self._vad.frames(frames)  # type: ignore[union-attr]
        if o.noise_gate_db > 0:
            speech &= self._above_noise(frames.reshape(n, VAD_FRAME))
        start_frames = max(1, round(o.speech_start * SR / VAD_FRAME))
        silence_frames = max(1, round(o.silence * SR / VAD_FRAME))
        ring_frames = start_frames + round(o.prefix_padding * SR / VAD_FRAME)
        max_samples = int(o.max_utterance * SR)
        for k in range(n):
            frame = buf[k * VAD_FRAME : (k + 1) * VAD_FRAME]
            self._clock += VAD_FRAME
            if not self._open:
                self._ring.append(frame)
                if len(self._ring) > ring_frames:
                    self._ring.popleft()
                self._speech_run = self._speech_run + 1 if speech[k] else 0
                if self._speech_run >= start_frames:
                    held = np.concatenate(self._ring)
                    u = OpenSegment(next(self._items), self._clock - held.size, self.lm.encoder.acoustic_mels, self.lm.threads)
                    u.add(held)
                    self._ring.clear()
                    self._open.append(u)
                    self._silence_run, self._last_speech_end = 0, self._clock
                    self._emit(LiveEvent("speech_started", u.item, u.start / SR, u.start / SR))
                continue
            u = self._open[0]
            u.add(frame)
            if speech[k]:
                self._silence_run, self._last_speech_end = 0, self._clock
            else:
                self._silence_run += 1
            if self._silence_run >= silence_frames:
                self._close_utterance(u, self._last_speech_end)
            elif u.n >= max_samples:
                self._close_utterance(u, self._clock)
                if speech[k]:  # still talking: the next utterance starts here
                    nxt = OpenSegment(next(self._items), self._clock, self.lm.encoder.acoustic_mels, self.lm.threads)
                    self._open.append(nxt)
                    self._emit(LiveEvent("speech_started", nxt.item, nxt.start / SR, nxt.start / SR))

    def _above_noise(self, frames: np.ndarray) -> np.ndarray:
        """Frames louder than the background by ``noise_gate_db``. WebRTC's VAD calls steady
        noise speech (it would hold an utterance open until the noise stops); the background is
        the 10th percentile of the last 2 s of frame energies (minimum statistics: pauses between
        words reach it in continuous speech, and it follows a change of background within 2 s;
        measured on held-out toy clips over noise, 6 s windows kept utterances open 0.8 s longer,
        1 s windows split one)."""
        energy = np.mean(np.square(frames, dtype=np.float64), axis=1) + 1e-12
        out = np.empty(energy.size, bool)
        for k, e in enumerate(energy):
            self._energies.append(e)
            out[k] = e > np.percentile(self._energies, 10) * self._gate
        return out

    def _unsegmented_audio(self, block: np.ndarray) -> None:
        """Without voice activity: one utterance from the first audio to a commit (or the
        longest utterance)."""
        max_samples = int(self.options.max_utterance * SR)
        pos = 0
        while pos < block.size:
            if not self._open:
                u = OpenSegment(next(self._items), self._clock, self.lm.encoder.acoustic_mels, self.lm.threads)
                self._open.append(u)
                self._emit(LiveEvent("speech_started", u.item, u.start / SR, u.start / SR))
            u = self._open[0]
            take = min(block.size - pos, max_samples - u.n)
            u.add(block[pos : pos + take])
            pos += take
            self._clock += take
            self._last_speech_end = self._clock
            if u.n >= max_samples:
                self._close_utterance(u, self._clock)

    def _close_utterance(self, u: OpenSegment, speech_end: int) -> None:
        """End ``u`` (its audio keeps the quiet after ``speech_end``, as offline clips have it) and
        ask for its final."""
        self._open.remove(u)
        u.speech_end = max(speech_end, u.start)
        self._emit(LiveEvent("speech_stopped", u.item, u.start / SR, speech_end / SR))
        self._final(u)
        self._speech_run = self._silence_run = 0

    # captions --------------------------------------------------------------------------------
    def _caption_audio(self, block: np.ndarray) -> None:
        win, hop = int(self.options.window * SR), int(self.options.hop * SR)
        pos = 0
        while pos < block.size:
            if self._next_window <= self._clock:
                self._open.append(OpenSegment(next(self._items), self._clock, self.lm.encoder.acoustic_mels, self.lm.threads))
                self._next_window = self._clock + hop
            bound = min([self._next_window] + [w.start + win for w in self._open])
            take = min(block.size - pos, bound - self._clock)
            piece = block[pos : pos + take]
            for w in self._open:
                w.add(piece)
            self._clock += take
            pos += take
            for w in [w for w in self._open if w.start + win <= self._clock]:
                self._open.remove(w)
                self._final(w)

    # both ------------------------------------------------------------------------------------
    def _close_all(self) -> None:
        """Close what is open (a commit, dropped audio, the end of the stream)."""
        if self.options.task == "transcribe":
            for u in list(self._open):
                self._close_utterance(u, self._last_speech_end)
            self._ring.clear()
            self._frame_rest = np.zeros(0, np.float32)
            self._speech_run = 0
            return
        # captions: the oldest open window holds all the audio no final has heard yet
        if self._open and self._clock > self._heard_until:
            self._final(self._open[0])
        self._open.clear()

    def _request(self, u: OpenSegment, final: bool) -> tuple[Request, int]:
        emb = u.embeddings(self.lm, final=final)
        return Request(audio=Embedded(emb, u.n), prompt=self.options.prompt, options=self.options.generation,
                       tag=u.item), int(emb.shape[0])

    def _final(self, u: OpenSegment) -> None:
        if u.n == 0:
            return
        if self._partial_ticket is not None and self._partial_ticket.request.tag == u.item:
            self._partial_ticket.cancel()
        req, n_tokens = self._request(u, final=True)
        self._heard_until = max(self._heard_until, u.start + u.n)
        start, end = u.start / SR, (u.speech_end if u.speech_end is not None else u.start + u.n) / SR
        with self._results_lock:
            self._final_order.append(u.item)

        def done(t: Ticket) -> None:
            self._count_decoder(t)
            out = t.outcome
            if isinstance(out, MdlEdgeError):
                ev = LiveEvent("error", u.item, start, end, f"{self.name}: item {u.item}: {out}")
            else:
                assert out is not None
                ev = LiveEvent("final", u.item, start, end, out.text.strip(), n_tokens, len(out.token_ids))
            ready = []
            with self._results_lock:
                self._in_flight.pop(id(t), None)
                self._done_finals[u.item] = ev
                while self._final_order and self._final_order[0] in self._done_finals:
                    ready.append(self._done_finals.pop(self._final_order.popleft()))
                self._finals_idle.notify_all()
            for e in ready:  # in item order, however the decoder finished them
                self._emit(e)

        t = self.engine.submit(req, on_text=lambda piece: self._emit(LiveEvent("final_delta", u.item, start, end, piece)),
                               on_done=done)
        with self._results_lock:
            self._in_flight[id(t)] = t

    def _maybe_partial(self) -> None:
        o = self.options
        if not o.partial_every or not self._open:
            return
        u = self._open[0]
        now = time.perf_counter()
        if (u.n < C.MIN_SAMPLES or u.n - u.last_partial_at < o.partial_every * SR or now < self._next_partial_wall
                or (self._partial_ticket is not None and not self._partial_ticket.finished)):
            return
        u.last_partial_at = u.n
        u.partial_seq += 1
        seq, item = u.partial_seq, u.item
        start, end = u.start / SR, (u.start + u.n) / SR
        req, n_tokens = self._request(u, final=False)

        def done(t: Ticket) -> None:
            self._count_decoder(t)
            cost = time.perf_counter() - now
            self._next_partial_wall = now + cost / o.partial_budget
            with self._results_lock:
                self._in_flight.pop(id(t), None)
                stale = item in self._done_finals or item in self._final_order or seq != u.partial_seq
            out = t.outcome
            if not stale and not t.cancelled and not isinstance(out, MdlEdgeError) and out is not None:
                self._emit(LiveEvent("partial", item, start, end, out.text.strip(), n_tokens, len(out.token_ids)))

        t = self.engine.submit(req, on_done=done)
        self._partial_ticket = t
        with self._results_lock:
            self._in_flight[id(t)] = t
