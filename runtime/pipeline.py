"""``AudioLM``: the whole runtime behind one class, built from a bundle folder (torch-free).

audio file -> blocks of mono 16 kHz -> log-mel (C++, block by block) -> encoder chunks (ONNX
Runtime) -> stitch -> projector -> prompt with audio embeddings -> llama.cpp generation.

The waveform is never held whole: it is decoded block by block into the log-mel, and each
chunk's features are projected as soon as they are stitched, so what a long file leaves in
memory is its log-mel (26 kB per second) and its embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

import numpy as np

from . import constants as C
from .audio import AudioSource, describe, expected_samples, iter_audio
from .bundle import Bundle
from .batching import NOT_READY, DecodeRequest, Failed, generate_many
from .prompt import Segment, split_prompt
from .stream import Stream
from .errors import AudioError, MdlEdgeError
from .heap import release_freed_memory
from .mel import log_mel_blocks
from .options import DecoderOptions, EncoderOptions, GenerationOptions, decoder_options, encoder_options, resolve_threads, whole_number
from .prompt import CAPTION_PROMPT, question_prompt, transcribe_prompt, user_message
from .segments import SegmentOptions, TimedSegment, segment_stream

logger = logging.getLogger("mdl_edge")

_DEFAULT = GenerationOptions()
#: Embeddings kept for clips asked about again (a server's several questions about one clip):
#: the most recent clips, up to this many bytes in all.
EMBEDDING_CACHE_BYTES = 64 << 20

#: What :meth:`AudioLM.run` and :meth:`AudioLM.segments` use to answer requests: it takes an
#: iterable of :class:`Request` and yields ``(request, Result or error)`` as each finishes.
Runner = Callable[[Iterable["Request"]], Iterator[tuple["Request", "Result | MdlEdgeError"]]]


@dataclass(frozen=True)
class Result:
    """One answer about one clip."""

    text: str
    token_ids: tuple[int, ...]
    n_audio_tokens: int
    audio_seconds: float
    stop_reason: str  # "stop_token", "stop_string" or "max_new_tokens"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    n_prompt: int = 0  # prompt positions (text and audio)
    n_evaluated: int = 0  # of them evaluated for this answer (the rest was in the KV cache)

    def as_segment(self) -> TimedSegment:
        """The whole clip as one timed segment (0 to its duration), for segment writers."""
        return TimedSegment(0, 0.0, self.audio_seconds, self.text, self.token_ids, self.stop_reason, self.timings)

    @property
    def tokens_per_second(self) -> float:
        """Decode rate (new tokens / decode time)."""
        return len(self.token_ids) / self.timings["decode"] if self.timings.get("decode") else 0.0


class AudioLM:
    """MiDashengLM on a CPU from a bundle made by ``mdl-edge export``.

    Keyword options: ``threads`` (default: the cores available); ``encoder``: an
    :class:`~mdl_edge.runtime.options.EncoderOptions` or just a variant name from the bundle's
    manifest (provider, chunks per ONNX run, static frames, exact int8 kernels); ``decoder``: a
    :class:`~mdl_edge.runtime.options.DecoderOptions` or a variant name (context size, prompt
    batch, f32 KV cache for parity, flash attention, repacked weights). Unset: the manifest's
    default variants with default options.

    One instance is safe to share between threads: generations take turns on the one llama.cpp
    context. A stream holds the context until it is read to the end or closed.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        encoder: str | EncoderOptions | None = None,
        decoder: str | DecoderOptions | None = None,
    ) -> None:
        threads = resolve_threads(threads)
        self.bundle = Bundle.open(path)
        self.prompt = self.bundle.prompt
        self.encoder_options, self.decoder_options = encoder_options(encoder), decoder_options(decoder)
        self.encoder_variant, self.encoder = self.bundle.load_encoder(self.encoder_options, threads=threads)
        self.decoder_variant, self.decoder = self.bundle.load_decoder(self.decoder_options, threads=threads)
        # prompts tokenized by the decoder's own vocabulary where it agrees with tokenizer.json,
        # whose tokenizer is then dropped
        self.prompt = self.bundle.prompt.on_llama_vocab(self.decoder)
        self.bundle = replace(self.bundle, prompt=self.prompt)
        release_freed_memory()
        self.threads = threads
        # Recent clips' embeddings, for follow-up questions: source key -> (embeddings, samples).
        self._cache: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the llama.cpp context and model."""
        self.decoder.close()

    def __enter__(self) -> "AudioLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear_cache(self) -> None:
        """Forget the audio embeddings kept for clips asked about again (up to
        :data:`EMBEDDING_CACHE_BYTES`): the next request about any clip runs the encoder."""
        with self._cache_lock:
            self._cache.clear()

    # -- audio -------------------------------------------------------------------------------
    def embed(
        self,
        audio: AudioSource,
        *,
        sample_rate: int | None = None,
        timings: dict[str, float] | None = None,
        on_chunks: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, int]:
        """Audio embeddings ``[n_audio_tokens, H]`` of a clip and its length in 16 kHz samples.

        The clip is decoded block by block into the log-mel (never held whole). Recent clips'
        embeddings are kept for follow-up questions (arrays and bytes are recognised by content,
        files by path, size and modification time; the same clip gives the same array, which lets
        concurrent questions about it share their decoded prompt start). ``on_chunks(done,
        total)`` reports encoder progress on long audio.
        """
        t = timings if timings is not None else {}
        if isinstance(audio, Embedded):
            t.update(decode_audio=0.0, mel=0.0, encoder=0.0, projector=0.0)
            return audio.embeddings, audio.n_samples
        key = _source_key(audio, sample_rate)
        with self._cache_lock:
            cached = self._cache.get(key) if key is not None else None
            if cached is not None:
                self._cache.move_to_end(key)  # type: ignore[arg-type]
        if cached is not None:
            t.update(decode_audio=0.0, mel=0.0, encoder=0.0, projector=0.0)
            return cached
        decode_s = [0.0]
        t0 = time.perf_counter()
        blocks = _TimedBlocks(iter_audio(audio, sample_rate=sample_rate), decode_s)
        mel = log_mel_blocks(blocks, expected_samples=expected_samples(audio), acoustic_mels=self.encoder.acoustic_mels,
                             n_threads=self.threads)
        n_samples = blocks.n_samples
        t.update(decode_audio=decode_s[0], mel=time.perf_counter() - t0 - decode_s[0])
        emb = self.encoder.embed_mel(mel, n_samples, timings=t, on_chunks=on_chunks)
        del mel, blocks
        release_freed_memory()  # the encoder's runs are freed by now
        if key is not None and emb.nbytes <= EMBEDDING_CACHE_BYTES:
            emb.setflags(write=False)  # shared between requests
            with self._cache_lock:
                self._cache[key] = (emb, n_samples)
                while sum(e.nbytes for e, _ in self._cache.values()) > EMBEDDING_CACHE_BYTES:
                    self._cache.popitem(last=False)
        return emb, n_samples

    # -- generation --------------------------------------------------------------------------
    def stream(
        self,
        audio: AudioSource,
        prompt: str,
        options: GenerationOptions = _DEFAULT,
        *,
        sample_rate: int | None = None,
        messages: list[dict[str, Any]] | None = None,
        on_chunks: Callable[[int, int], None] | None = None,
    ) -> Stream[Result]:
        """Answer ``prompt`` about ``audio`` (a path, bytes, file object, or array with
        ``sample_rate``), as a stream of text pieces; ``stream.result()`` gives the
        :class:`Result` once it is read to the end. ``messages`` replaces the default user turn
        (one audio item). Closing the stream early stops generation before the next token and
        frees the decoder. Nothing runs until the stream is read."""
        if not isinstance(options, GenerationOptions):
            raise TypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
        return Stream(self._run(audio, prompt, options, sample_rate, messages, on_chunks))

    def _prompt_for(self, embs: list[np.ndarray], prompt: str, options: GenerationOptions,
                    messages: list[dict[str, Any]] | None = None) -> tuple[tuple[Segment, ...], tuple[int, ...]]:
        """The decoder's prompt segments for the clips' embeddings (one per audio item of
        ``messages``, in order), and the stop ids of ``options``."""
        ids = self._prompt_ids([e.shape[0] for e in embs], prompt, options, messages)
        stop_ids = () if options.ignore_eos else (*self.prompt.stop_ids, *options.stop_ids)
        return tuple(split_prompt(ids, embs, self.prompt.special.audio)), tuple(stop_ids)

    def positions_needed(self, n_audio_tokens: Iterable[int], prompt: str, options: GenerationOptions = _DEFAULT,
                         messages: list[dict[str, Any]] | None = None) -> int:
        """Decoder positions a request needs (prompt, ``max_new_tokens`` and one), known from
        its clips' lengths before any audio is decoded; compare with ``decoder.max_positions``."""
        return len(self._prompt_ids(list(n_audio_tokens), prompt, options, messages)) + options.max_new_tokens + 1

    def _prompt_ids(self, n_audio_tokens: list[int], prompt: str, options: GenerationOptions,
                    messages: list[dict[str, Any]] | None) -> list[int]:
        """The prompt's token ids: ``messages`` (or the default user turn), each audio item
        expanded to its clip's count of placeholders."""
        return self.prompt.encode(messages or user_message(prompt, audio_first=options.audio_first), n_audio_tokens)

    def _run(
        self,
        audio: AudioSource,
        prompt: str,
        options: GenerationOptions,
        sample_rate: int | None,
        messages: list[dict[str, Any]] | None,
        on_chunks: Callable[[int, int], None] | None,
    ) -> Generator[str, None, Result]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        emb, n_samples = self.embed(audio, sample_rate=sample_rate, timings=timings, on_chunks=on_chunks)
        segments, stop_ids = self._prompt_for([emb], prompt, options, messages)
        first: float | None = None
        t_gen = time.perf_counter()
        with self.decoder.generate(segments, max_new_tokens=options.max_new_tokens, stop_ids=stop_ids, stop_strings=options.stop,
                                   sampling=options.sampling) as gen:
            for piece in gen:
                if first is None:
                    first = time.perf_counter() - t_gen
                yield piece
            res = gen.result()
        timings.update(prefill=res.prefill_s, decode=res.decode_s)
        before = timings["decode_audio"] + timings["mel"] + timings["encoder"] + timings["projector"]
        timings["time_to_first_token"] = before + (first if first is not None else res.prefill_s)
        timings["total"] = time.perf_counter() - t0
        return Result(res.text, res.token_ids, int(emb.shape[0]), n_samples / C.SAMPLE_RATE, res.stop_reason, timings, res.n_prompt, res.n_evaluated)

    def generate(
        self,
        audio: AudioSource,
        prompt: str,
        options: GenerationOptions = _DEFAULT,
        *,
        sample_rate: int | None = None,
        messages: list[dict[str, Any]] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_chunks: Callable[[int, int], None] | None = None,
    ) -> Result:
        """Answer ``prompt`` about ``audio`` (see :meth:`stream`); ``on_text`` receives the text
        as it is generated."""
        with self.stream(audio, prompt, options, sample_rate=sample_rate, messages=messages, on_chunks=on_chunks) as s:
            for piece in s:
                if on_text:
                    on_text(piece)
            return s.result()

    def caption(self, audio: AudioSource, options: GenerationOptions = _DEFAULT, **call: Any) -> Result:
        """Caption a clip (the paper's prompt ``"Caption the audio."``). ``call``: the keyword
        arguments of :meth:`generate` (``sample_rate``, ``on_text``, ``on_chunks``)."""
        return self.generate(audio, CAPTION_PROMPT, options, **call)

    def transcribe(self, audio: AudioSource, options: GenerationOptions = _DEFAULT, *, language: str | None = None, **call: Any) -> Result:
        """Transcribe speech; ``language`` (a short code: ``"en"``, ``"zh"``) adds the ``<|xx|>`` tag."""
        return self.generate(audio, transcribe_prompt(language), options, **call)

    def ask(self, audio: AudioSource, question: str, options: GenerationOptions = _DEFAULT, **call: Any) -> Result:
        """Answer a question about a clip. Several questions about one clip reuse its encoding;
        with ``audio_first=True`` they also reuse the decoder's evaluated audio prefix."""
        return self.generate(audio, question_prompt(question), options, **call)


    # -- many requests -----------------------------------------------------------------------
    def run(self, requests: Iterable[Request], *, parallel: int = 4, overlap: bool = False,
            stats: dict[str, float] | None = None) -> Iterator[tuple[Request, Result | MdlEdgeError]]:
        """Answer many requests, up to ``parallel`` decoded together in the one llama.cpp context
        (continuous batching, see :mod:`~mdl_edge.runtime.batching`); yields ``(request, result)``
        as each finishes, or ``(request, error)`` for one that failed (a file that cannot be
        read, a clip too long for the context): the others go on. ``requests`` is read lazily:
        a clip is decoded and encoded when a decoder slot is about to free, so a folder of
        thousands of files never sits in memory. A request's ``on_text`` receives its text as it
        is generated, and its ``cancelled`` is asked before each step. An item of ``requests``
        may be :data:`~mdl_edge.runtime.batching.NOT_READY` (a live source, such as a server's
        queue, with nothing yet): running requests go on meanwhile. Closing the iterator early
        stops every request. ``overlap=True`` encodes
        the next clips in a background thread while the decoder steps (see the README for what
        it measured). ``stats`` (a dict) receives the decoder's step counts and the time of its
        decode-only steps (for benchmarks)."""
        whole_number("parallel", parallel)
        # per submission (numbered: the same Request object may come twice)
        state: dict[int, tuple[Request, dict[str, float], float, int, int]] = {}

        def prepared() -> Iterator[Any]:
            for n, req in enumerate(requests):
                if req is NOT_READY:  # a live source (a server's queue) has nothing yet
                    yield req
                    continue
                if not isinstance(req, Request):
                    raise TypeError(f"requests must be Request objects, got {type(req).__name__}")
                timings: dict[str, float] = {}
                t0 = time.perf_counter()
                state[n] = (req, timings, t0, 0, 0)
                if req.cancelled is not None and req.cancelled():
                    yield Failed(n, MdlEdgeError("cancelled"))
                    continue
                try:
                    clips = [self.embed(a, sample_rate=req.sample_rate, timings=timings) for a in req.clips]
                    embs = [e for e, _ in clips]
                    segments, stop_ids = self._prompt_for(embs, req.prompt, req.options, req.messages)
                except MdlEdgeError as e:
                    yield Failed(n, e)
                    continue
                state[n] = (req, timings, t0, sum(e.shape[0] for e in embs), sum(k for _, k in clips))
                yield DecodeRequest(segments, n, req.options.max_new_tokens, stop_ids, req.options.sampling, req.options.stop,
                                    req.cancelled)

        source: Iterator[Any] = _ahead(prepared(), parallel) if overlap else prepared()
        with generate_many(self.decoder, source, slots=parallel) as events:
            first: dict[int, float] = {}
            for ev in events:
                req, timings, t0, n_tokens, n_samples = state[ev.key]
                if ev.text:
                    first.setdefault(ev.key, time.perf_counter() - t0)
                    if req.on_text:
                        req.on_text(ev.text)
                if not ev.done:
                    continue
                del state[ev.key]
                if ev.error is not None:
                    yield req, ev.error if isinstance(ev.error, MdlEdgeError) else MdlEdgeError(str(ev.error))
                    continue
                res = ev.result
                assert res is not None
                timings.update(prefill=res.prefill_s, decode=res.decode_s, total=time.perf_counter() - t0)
                timings["time_to_first_token"] = first.pop(ev.key, timings["total"])
                yield req, Result(res.text, res.token_ids, n_tokens, n_samples / C.SAMPLE_RATE, res.stop_reason, timings,
                                  res.n_prompt, res.n_evaluated)
            if stats is not None:
                stats.update(events.stats)


    # -- long recordings -----------------------------------------------------------------------
    def transcribe_segments(self, audio: AudioSource, options: GenerationOptions = _DEFAULT, *, language: str | None = None,
                            segmenting: SegmentOptions = SegmentOptions(), **call: Any) -> Iterator[TimedSegment]:
        """Transcribe a recording of any length as timed segments, cut at pauses (see
        :class:`~mdl_edge.runtime.segments.SegmentOptions`). ``call``: ``sample_rate``,
        ``parallel`` (segments decoded together), ``on_segment(done)`` (progress)."""
        return self.segments(audio, transcribe_prompt(language), options, mode=segmenting.resolved("transcribe"), segmenting=segmenting, **call)

    def caption_segments(self, audio: AudioSource, options: GenerationOptions = _DEFAULT, *,
                         segmenting: SegmentOptions = SegmentOptions(), **call: Any) -> Iterator[TimedSegment]:
        """A caption timeline of a recording: one caption per window (default 10 s)."""
        return self.segments(audio, CAPTION_PROMPT, options, mode=segmenting.resolved("caption"), segmenting=segmenting, **call)

    def segments(self, audio: AudioSource, prompt: str, options: GenerationOptions = _DEFAULT, *, mode: str = "vad",
                 segmenting: SegmentOptions = SegmentOptions(), sample_rate: int | None = None, parallel: int = 1,
                 on_segment: Callable[[int], None] | None = None, runner: Runner | None = None) -> Iterator[TimedSegment]:
        """Answer ``prompt`` about each segment of a recording, in order, as each is done. The
        audio is decoded block by block and segments are answered as they close (``parallel`` of
        them decoded together), so memory does not grow with the duration. If decoding fails
        part-way (a truncated or corrupt file), the segments before the damage are yielded, then an
        :class:`AudioError` names the file and the time where decoding failed. ``runner``
        answers the segments' requests instead of :meth:`run` (a server's shared engine)."""
        name = describe(audio)
        damage: list[tuple[float, AudioError]] = []

        def blocks() -> Iterator[np.ndarray]:
            n = 0
            try:
                for block in iter_audio(audio, sample_rate=sample_rate):
                    n += block.size
                    yield block
            except AudioError as e:
                if n == 0:
                    raise
                damage.append((n / C.SAMPLE_RATE, e))

        def requests() -> Iterator[Request]:
            if mode == "none":  # the whole clip as one request, streamed from its source as usual
                yield Request(audio=audio, prompt=prompt, options=options, sample_rate=sample_rate, tag=(0, 0, None))
                return
            for i, (start, samples) in enumerate(segment_stream(blocks(), segmenting, mode)):
                yield Request(audio=samples, prompt=prompt, options=options, sample_rate=C.SAMPLE_RATE, tag=(i, start, samples.size))

        done: dict[int, TimedSegment] = {}
        n_out = 0
        answered = runner(requests()) if runner is not None else self.run(requests(), parallel=parallel)
        for req, res in answered:
            i, start, n = req.tag
            if isinstance(res, MdlEdgeError):
                if n is None:
                    raise res
                raise (AudioError if isinstance(res, AudioError) else MdlEdgeError)(f"{name}: segment {start / C.SAMPLE_RATE:.2f}-{(start + n) / C.SAMPLE_RATE:.2f} s: {res}") from res
            n = n if n is not None else int(round(res.audio_seconds * C.SAMPLE_RATE))
            done[i] = TimedSegment(i, start / C.SAMPLE_RATE, (start + n) / C.SAMPLE_RATE, res.text, res.token_ids, res.stop_reason, res.timings)
            while n_out in done:
                yield done.pop(n_out)
                n_out += 1
                if on_segment:
                    on_segment(n_out)
        if damage:
            at, err = damage[0]
            raise AudioError(f"{name}: decoding failed {at:.2f} s into the recording (the segments before it were answered): {err}") from err


@dataclass(frozen=True, eq=False)
class Embedded:
    """A clip already encoded (a live stream's utterance, encoded chunk by chunk as it arrived):
    its audio embeddings ``[n_audio_tokens, H]`` and its length in 16 kHz samples. Anywhere a
    request takes audio it takes this, and the encoder is skipped."""

    embeddings: np.ndarray
    n_samples: int


@dataclass(frozen=True, kw_only=True)
class Request:
    """One question about one clip for :meth:`AudioLM.run`: the audio (a path, bytes, a file
    object, or an array with ``sample_rate``), the prompt (default: caption), the options,
    ``tag`` (anything the caller wants back, e.g. a file name) and ``on_text``."""

    audio: AudioSource | tuple[AudioSource, ...]
    prompt: str = CAPTION_PROMPT
    options: GenerationOptions = _DEFAULT
    sample_rate: int | None = None
    tag: Any = None
    on_text: Callable[[str], None] | None = None
    #: the conversation, replacing the default user turn; one audio item per clip of ``audio``
    #: (then a tuple of clips, in the order of the audio items)
    messages: list[dict[str, Any]] | None = None
    #: called before each decoding step; True stops the request (a client that went away)
    cancelled: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.options, GenerationOptions):
            raise TypeError(f"options must be a GenerationOptions, got {type(self.options).__name__}")
        if isinstance(self.audio, tuple) and not self.audio and self.messages is None:
            raise AudioError("a request needs at least one clip (or messages of its own)")

    @property
    def clips(self) -> tuple[AudioSource, ...]:
        """The request's clips, in order."""
        return self.audio if isinstance(self.audio, tuple) else (self.audio,)


def _ahead(items: Iterator[Any], n: int) -> Iterator[Any]:
    """Produce ``items`` in a background thread, at most ``n`` ahead of the consumer; while none is
    ready, yield :data:`~mdl_edge.runtime.batching.NOT_READY` instead of blocking. An exception in
    the producer is raised here. Stops the producer when closed."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=n)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    worker = threading.Thread(target=produce, name="mdl-edge-encoder", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                yield NOT_READY
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


class _TimedBlocks(Iterator[np.ndarray]):
    """Wraps the audio block iterator: adds the time spent producing blocks (file decoding and
    resampling) to ``acc[0]`` and counts the samples."""

    def __init__(self, blocks: Iterator[np.ndarray], acc: list[float]) -> None:
        self.blocks, self.acc, self.n_samples = blocks, acc, 0

    def __next__(self) -> np.ndarray:
        t = time.perf_counter()
        try:
            block = next(self.blocks)
        finally:
            self.acc[0] += time.perf_counter() - t
        self.n_samples += block.size
        return block


def _source_key(audio: AudioSource, sample_rate: int | None) -> bytes | None:
    """What identifies a clip for the embedding cache without decoding it; None: not cacheable."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(audio, np.ndarray):
        h.update(f"array {audio.shape} {audio.dtype} {sample_rate}".encode())
        h.update(np.ascontiguousarray(audio).view(np.uint8))
    elif isinstance(audio, (bytes, bytearray)):
        h.update(b"bytes")
        h.update(audio)
    elif isinstance(audio, (str, Path)):
        try:
            st = Path(audio).stat()
        except OSError:
            return None  # decoding will report it
        h.update(f"file {Path(audio).resolve()} {st.st_size} {st.st_mtime_ns} {sample_rate}".encode())
    else:
        return None
    return h.digest()
