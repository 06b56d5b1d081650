"""``mdl-edge serve``: OpenAI's audio API on a local HTTP server (the ``server`` extra).

Apps in any language embed captioning and transcription by talking to ``127.0.0.1`` with the
client library they already have. Built on FastAPI + uvicorn (what llama-cpp-python's and vLLM's
OpenAI servers use): asyncio streaming with disconnect detection, multipart uploads through
python-multipart (spooled by Starlette to anonymous temporary files, closed after the upload is
read), and prometheus-client for the metrics text format.

One :class:`~mdl_edge.runtime.engine.Engine` holds the bundle's decoder: requests that overlap
decode together (continuous batching), each HTTP request is a job whose text arrives through an
asyncio queue (``runtime/jobs.py``), and a client that goes away cancels its job (its slot frees
before the next token). OpenAI's request and response shapes live in ``runtime/wire.py``; this
module holds the options, the state and metrics, the routing table and running the server; the
handlers are in ``runtime/handlers.py``. Admission is bounded: ``parallel`` running plus ``max_queue`` waiting; beyond that a
request gets 503 with ``Retry-After``.

OpenAI's API is followed where it defines behaviour; where this model differs it says so:
``model`` is echoed, never used to find anything (one model per server); a transcription's
``prompt`` replaces the task instruction (the model takes instructions, not Whisper's
previous-text context); ``verbose_json`` segments carry times and token ids but no log
probabilities (``avg_logprob`` and the like are null); ``audio_url`` parts must be ``data:`` URLs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from .engine import Engine
from .errors import MdlEdgeError, OptionError
from .jobs import ClientGone
from .options import DecoderOptions, EncoderOptions, decoder_options, default_parallel, whole_number
from .pipeline import AudioLM, Result
from .segments import SegmentOptions
from .wire import ApiError

logger = logging.getLogger("mdl_edge")

#: Decoder positions per slot by default: a 5-minute clip (1500 audio tokens) with its prompt and
#: a 256-token answer fits one (Qwen3-0.6B's f16 cache: 0.23 GB per slot; Qwen2-7B's: 0.11 GB).
CTX_PER_SLOT = 2048


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """How the server listens and what it accepts (validated here).

    ``api_key``: when set, every ``/v1`` and ``/metrics`` request must send
    ``Authorization: Bearer KEY``. ``parallel``: requests decoded together; ``max_queue``:
    admitted requests beyond those (more get 503). ``max_upload_mb`` / ``max_audio_s``: the
    largest upload and the longest recording (more gets 413). ``model_id``: the name
    ``/v1/models`` lists (default: the bundle folder's name). ``segmenting``: how transcriptions
    longer than ``segmenting.max_segment`` are cut (as on the command line). ``n_ctx``: the
    decoder's KV cache in positions, shared by the requests decoding together (default:
    ``parallel`` x :data:`CTX_PER_SLOT`); it is allocated once, so memory stays what it was at
    start whatever clients ask, and a request needing more gets 400 ``context_length_exceeded``.
    ``max_realtime``: open Realtime WebSocket connections (more are refused); ``max_realtime_buffer_s``:
    audio buffered per connection before its messages are read more slowly.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    parallel: int = field(default_factory=default_parallel)
    max_queue: int = 16
    max_upload_mb: float = 25.0
    max_audio_s: float = 3600.0
    model_id: str | None = None
    segmenting: SegmentOptions = SegmentOptions()
    n_ctx: int | None = None
    max_realtime: int = 8
    max_realtime_buffer_s: float = 10.0

    def __post_init__(self) -> None:
        whole_number("port", self.port, 0)
        if self.n_ctx is not None:
            whole_number("n_ctx", self.n_ctx, 256)
        if self.port > 65535:
            raise OptionError("port", f"must be at most 65535, got {self.port}")
        whole_number("parallel", self.parallel)
        whole_number("max_queue", self.max_queue, 0)
        whole_number("max_realtime", self.max_realtime, 0)
        if isinstance(self.max_realtime_buffer_s, bool) or not isinstance(self.max_realtime_buffer_s, (int, float)) \
                or not 0.5 <= self.max_realtime_buffer_s <= 600:
            raise OptionError("max_realtime_buffer_s", f"must be between 0.5 and 600 seconds, got {self.max_realtime_buffer_s!r}")
        for name in ("max_upload_mb", "max_audio_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise OptionError(name, f"must be a positive number, got {v!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise OptionError("api_key", "must be a non-empty string (or unset)")

    @property
    def context_size(self) -> int:
        return self.n_ctx if self.n_ctx is not None else self.parallel * CTX_PER_SLOT

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def local(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")


# -- the server's state ---------------------------------------------------------------------------
class _Metrics:
    def __init__(self, state: "ServerState") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only double the page

        r = self.registry = CollectorRegistry()
        self.requests = Counter("mdl_edge_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.rejected = Counter("mdl_edge_rejected", "requests refused with 503 because the queue was full", registry=r)
        self.cancelled = Counter("mdl_edge_cancelled", "requests stopped because their client went away", registry=r)
        Gauge("mdl_edge_requests_in_progress", "admitted requests not yet answered", registry=r).set_function(lambda: state.in_progress)
        Gauge("mdl_edge_queue_depth", "admitted requests not yet taken by the decoder", registry=r).set_function(
            lambda: max(0, state.in_progress - state.engine.status().active))
        Gauge("mdl_edge_slots_busy", "requests the decoder holds (encoding, prefill or decode)", registry=r).set_function(
            lambda: state.engine.status().active)
        Gauge("mdl_edge_slots", "sequences decoded together", registry=r).set(state.options.parallel)
        Gauge("mdl_edge_realtime_connections", "open Realtime WebSocket connections", registry=r).set_function(lambda: state.realtime_open)
        self.prompt_tokens = Counter("mdl_edge_prompt_tokens", "prompt positions (text and audio)", registry=r)
        self.audio_tokens = Counter("mdl_edge_audio_tokens", "audio embeddings in prompts", registry=r)
        self.generated_tokens = Counter("mdl_edge_generated_tokens", "new tokens generated", registry=r)
        self.audio_seconds = Counter("mdl_edge_audio_seconds", "seconds of audio answered", registry=r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
        self.ttft = Histogram("mdl_edge_time_to_first_token_seconds", "from admission to the first text", buckets=buckets, registry=r)
        self.duration = Histogram("mdl_edge_request_duration_seconds", "from admission to the answer's end", buckets=buckets, registry=r)
        self.decode_rate = Histogram("mdl_edge_decode_tokens_per_second", "each answer's new tokens per second of decoding",
                                     buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320), registry=r)
        self._tokens = Gauge("mdl_edge_tokens_per_second", "new tokens per second over the last 10 s", registry=r)
        self._recent: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._tokens.set_function(self.recent_rate)

    def answered(self, res: Result) -> None:
        self.prompt_tokens.inc(res.n_prompt)
        self.audio_tokens.inc(res.n_audio_tokens)
        self.generated_tokens.inc(len(res.token_ids))
        self.audio_seconds.inc(res.audio_seconds)
        if res.timings.get("decode"):
            self.decode_rate.observe(res.tokens_per_second)
        with self._lock:
            self._recent.append((time.monotonic(), len(res.token_ids)))

    def recent_rate(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            self._recent = [(t, n) for t, n in self._recent if now - t <= window]
            return sum(n for _, n in self._recent) / window


class ServerState:
    """What the app's handlers share: the model, its engine, admission and metrics."""

    def __init__(self, lm: AudioLM, options: ServerOptions) -> None:
        self.lm, self.options = lm, options
        self.model_id = options.model_id or lm.bundle.dir.name
        self.created = int(time.time())
        self.engine = Engine(lm, parallel=options.parallel)
        self.in_progress = 0
        self.realtime_open = 0
        self._lock = threading.Lock()
        self._durations: list[float] = []
        self.metrics = _Metrics(self)

    def admit(self) -> None:
        with self._lock:
            if self.in_progress >= self.options.parallel + self.options.max_queue:
                self.metrics.rejected.inc()
                recent = self._durations[-20:] or [1.0]
                retry = max(1, math.ceil(sum(recent) / len(recent)))
                raise ApiError(503, f"the server is busy ({self.in_progress} requests in progress, at most "
                               f"{self.options.parallel} decoding and {self.options.max_queue} waiting); retry in {retry} s",
                               type="server_error", code="server_overloaded", headers={"Retry-After": str(retry)})
            self.in_progress += 1

    def release(self, seconds: float) -> None:
        with self._lock:
            self.in_progress -= 1
            self._durations = (self._durations + [seconds])[-100:]

    def open_realtime(self) -> bool:
        """Count a new Realtime connection in; False when the limit is reached."""
        with self._lock:
            if self.realtime_open >= self.options.max_realtime:
                self.metrics.rejected.inc()
                return False
            self.realtime_open += 1
            return True

    def close_realtime(self) -> None:
        with self._lock:
            self.realtime_open -= 1

    def close(self) -> None:
        self.engine.close()


# -- the app ------------------------------------------------------------------------------------
def create_app(lm: AudioLM, options: ServerOptions = ServerOptions()) -> Any:
    """The FastAPI app serving ``lm`` (its decoder is the server's from now on; closing the app's
    lifespan closes the engine, not ``lm``). The handlers live in ``runtime/handlers.py``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse

    from . import handlers as h
    from . import realtime

    state = ServerState(lm, options)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="mdl-edge", summary="MiDashengLM on the CPU, through OpenAI's audio API", lifespan=lifespan)
    app.state.mdl = state
    app.add_exception_handler(ApiError, h.on_api_error)
    app.add_exception_handler(ClientGone, h.on_client_gone)
    app.add_exception_handler(RequestValidationError, h.on_invalid)
    app.add_middleware(h.Guard)
    app.add_api_route("/", h.page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", h.health, methods=["GET"])
    app.add_api_route("/metrics", h.metrics, methods=["GET"])
    app.add_api_route("/v1/models", h.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id}", h.model, methods=["GET"])
    app.add_api_route(h.TRANSCRIPTIONS, h.transcriptions, methods=["POST"])
    app.add_api_route(h.CHAT, h.chat, methods=["POST"])
    app.add_api_websocket_route(realtime.PATH, realtime.realtime)
    return app


# -- running it ---------------------------------------------------------------------------------
def _load(model: str | Path, options: ServerOptions, threads: int | None, encoder: str | EncoderOptions | None,
          decoder: str | DecoderOptions | None) -> AudioLM:
    """The server's model: the decoder's context sized for the requests decoding together unless
    the decoder options say otherwise."""
    dec = decoder_options(decoder)
    if dec.n_ctx is None:
        dec = dataclasses.replace(dec, n_ctx=options.context_size)
    return AudioLM(model, threads=threads, encoder=encoder, decoder=dec)


class Server:
    """A server on a background thread (embedding apps, tests): ``with Server(model_dir) as s:``
    then talk to ``s.url``. ``threads``, ``encoder`` and ``decoder`` are :class:`AudioLM`'s load
    options; ``port=0`` picks a free port."""

    def __init__(self, model: str | Path | AudioLM, options: ServerOptions = ServerOptions(), *, threads: int | None = None,
                 encoder: str | EncoderOptions | None = None, decoder: str | DecoderOptions | None = None) -> None:
        import uvicorn

        self.lm = model if isinstance(model, AudioLM) else _load(model, options, threads, encoder, decoder)
        self._own_lm = not isinstance(model, AudioLM)
        self.options = options
        self.app = create_app(self.lm, options)
        config = uvicorn.Config(self.app, host=options.host, port=options.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="mdl-edge-server", daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port`` (the port the OS gave when ``port=0``)."""
        host = self.options.host if ":" not in self.options.host else f"[{self.options.host}]"
        return f"http://{host}:{self.port}"

    @property
    def port(self) -> int:
        for s in self._server.servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.options.port

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise MdlEdgeError(f"the server did not start on {self.options.host}:{self.options.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        if self._own_lm:
            self.lm.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(model: str | Path, options: ServerOptions = ServerOptions(), *, threads: int | None = None,
          encoder: str | EncoderOptions | None = None, decoder: str | DecoderOptions | None = None) -> None:
    """Serve a bundle in the foreground until interrupted (``mdl-edge serve``)."""
    import uvicorn

    if not options.local and options.api_key is None:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the model", options.host)
    lm = _load(model, options, threads, encoder, decoder)
    try:
        app = create_app(lm, options)
        logger.info("serving %s on http://%s:%d (%d decoded together in %d positions, %d waiting at most)", Path(model).name,
                    options.host, options.port, options.parallel, options.context_size, options.max_queue)
        uvicorn.run(app, host=options.host, port=options.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        lm.close()


__all__ = ["ApiError", "Server", "ServerOptions", "create_app", "serve"]
