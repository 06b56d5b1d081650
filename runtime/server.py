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
module holds the options, the state and metrics, the routes and running the server. Admission is bounded: ``parallel`` running plus ``max_queue`` waiting; beyond that a
request gets 503 with ``Retry-After``.

OpenAI's API is followed where it defines behaviour; where this model differs it says so:
``model`` is echoed, never used to find anything (one model per server); a transcription's
``prompt`` replaces the task instruction (the model takes instructions, not Whisper's
previous-text context); ``verbose_json`` segments carry times and token ids but no log
probabilities (``avg_logprob`` and the like are null); ``audio_url`` parts must be ``data:`` URLs.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run
# time, and the handlers' Request type is imported inside create_app (the extra is optional).
import asyncio
import dataclasses
import logging
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from . import constants as C
from .audio import AudioSource, expected_samples, iter_audio
from .engine import Engine
from .errors import AudioError, MdlEdgeError, OptionError, one_line
from .jobs import ClientGone, Job, final_event, first_event, new_job, next_event
from .options import DecoderOptions, EncoderOptions, GenerationOptions, SamplingOptions, decoder_options, default_parallel, whole_number
from .pipeline import AudioLM, Request, Result
from .prompt import CAPTION_PROMPT, transcribe_prompt
from .segments import SegmentOptions
from .wire import (RESPONSE_FORMATS, ApiError, chat_messages, chat_options, chat_usage, finish_reason, flag,
                   number, sse, transcript_response, transcript_usage)

logger = logging.getLogger("mdl_edge")

#: Decoder positions per slot by default: a 5-minute clip (1500 audio tokens) with its prompt and
#: a 256-token answer fits one (Qwen3-0.6B's f16 cache: 0.23 GB per slot; Qwen2-7B's: 0.11 GB).
CTX_PER_SLOT = 2048
STATIC = Path(__file__).with_name("static")


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

    def __post_init__(self) -> None:
        whole_number("port", self.port, 0)
        if self.n_ctx is not None:
            whole_number("n_ctx", self.n_ctx, 256)
        if self.port > 65535:
            raise OptionError("port", f"must be at most 65535, got {self.port}")
        whole_number("parallel", self.parallel)
        whole_number("max_queue", self.max_queue, 0)
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


# -- parameters -----------------------------------------------------------------------------------
def probe(source: AudioSource, name: str, max_audio_s: float) -> tuple[AudioSource, float]:
    """A clip's duration before any model work: from its header, or (a container without one) by
    decoding it, up to the limit. Raises 400 for audio that cannot be read, 413 for too long."""
    n = expected_samples(source)
    if n is None:
        limit = int(max_audio_s * C.SAMPLE_RATE)
        blocks, total = [], 0
        try:
            for block in iter_audio(source):
                total += block.size
                if total > limit:
                    break
                blocks.append(block)
        except AudioError as e:
            raise ApiError(400, f"{name}: {one_line(e).split(': ', 1)[-1]}", param="file", code="invalid_audio") from None
        if total > limit:
            raise ApiError(413, f"{name}: the audio is longer than the server's limit of {max_audio_s:g} s",
                           param="file", code="audio_too_long")
        source, n = np.concatenate(blocks), total
    seconds = n / C.SAMPLE_RATE
    if seconds > max_audio_s:
        raise ApiError(413, f"{name}: {seconds:.1f} s of audio is longer than the server's limit of {max_audio_s:g} s",
                       param="file", code="audio_too_long")
    return source, seconds


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

    def close(self) -> None:
        self.engine.close()


# -- jobs: one HTTP request's generation, its events in an asyncio queue ------------------------------
# -- the app ------------------------------------------------------------------------------------
def create_app(lm: AudioLM, options: ServerOptions = ServerOptions()) -> Any:
    """The FastAPI app serving ``lm`` (its decoder is the server's from now on; closing the app's
    lifespan closes the engine, not ``lm``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.datastructures import UploadFile

    state = ServerState(lm, options)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="mdl-edge", summary="MiDashengLM on the CPU, through OpenAI's audio API", lifespan=lifespan)
    app.state.mdl = state
    expected_auth = f"Bearer {options.api_key}".encode() if options.api_key else None

    def error_response(e: ApiError, endpoint: str) -> Any:
        state.metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, e: ApiError) -> Any:
        return error_response(e, request.url.path)

    @app.exception_handler(ClientGone)
    async def _gone(request: HttpRequest, e: ClientGone) -> Any:
        state.metrics.requests.labels(request.url.path, "499").inc()
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: HttpRequest, e: RequestValidationError) -> Any:
        return error_response(ApiError(400, f"invalid request: {e.errors()}"), request.url.path)

    def guard(path: str, method: str, headers: dict[bytes, bytes]) -> ApiError | None:
        if expected_auth is not None and (path.startswith("/v1/") or path == "/metrics"):
            if not secrets.compare_digest(headers.get(b"authorization", b""), expected_auth):
                return ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        length = headers.get(b"content-length", b"")
        # base64 in JSON is 4/3 of the audio; multipart adds its boundaries and fields
        cap = options.max_upload_bytes * 4 // 3 + (1 << 20)
        if method == "POST" and length.isdigit() and int(length) > cap:
            return ApiError(413, f"the request body ({int(length) / 2**20:.1f} MB) is larger than the server's upload limit of "
                            f"{options.max_upload_mb:g} MB", code="upload_too_large")
        return None

    class Guard:
        """API key and declared body size, checked before a handler runs. A plain ASGI middleware:
        Starlette's BaseHTTPMiddleware would wrap ``receive`` and hide client disconnects."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                err = guard(scope["path"], scope["method"], dict(scope["headers"]))
                if err is not None:
                    await error_response(err, scope["path"])(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    # -- plain endpoints --------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page() -> Any:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> Any:
        s = state.engine.status()
        return {"status": "ok", "model": state.model_id, "slots": s.slots, "slots_busy": s.active,
                "in_progress": state.in_progress, "auth": options.api_key is not None}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Any:
        if model_id != state.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist (this server serves {state.model_id!r})",
                           param="model", code="model_not_found")
        return _model_card(state)

    @app.get("/metrics")
    async def metrics() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- transcriptions -----------------------------------------------------------------------
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: HttpRequest) -> Any:
        endpoint = "/v1/audio/transcriptions"
        with new_job(state) as job:
            try:
                form = await request.form(max_files=1, max_fields=32)
            except Exception as e:  # a body that is not multipart form data
                raise ApiError(400, f"the request must be multipart/form-data with a 'file' part: {e}") from None
            try:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "the 'file' part (the audio) is missing", param="file")
                name = Path(upload.filename or "upload").name
                data = await _read_limited(upload, options.max_upload_bytes, name)
            finally:
                await form.close()
            fmt = str(form.get("response_format") or "json")
            if fmt not in RESPONSE_FORMATS:
                raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r}", param="response_format")
            stream = flag(form.get("stream") or "false", "stream")
            if stream and fmt not in ("json", "text"):
                raise ApiError(400, "stream=true gives text deltas; use response_format json or text with it", param="stream")
            granularities = form.getlist("timestamp_granularities[]")
            if any(g != "segment" for g in granularities):
                raise ApiError(400, "only segment timestamps are available (timestamp_granularities[]=segment)",
                               param="timestamp_granularities[]")
            language = form.get("language") or None
            try:
                instruction = transcribe_prompt(language if isinstance(language, str) else None)
            except OptionError as e:
                raise ApiError(400, one_line(e), param="language") from None
            if isinstance(form.get("prompt"), str) and form["prompt"].strip():
                instruction = form["prompt"]
            temperature = number(form.get("temperature") or 0, "temperature", 0, 2)
            gen = GenerationOptions(sampling=SamplingOptions(temperature=temperature))
            source, seconds = await asyncio.to_thread(probe, data, name, options.max_audio_s)
            seg = options.segmenting
            mode = seg.resolved("transcribe")
            mode = "none" if seconds <= seg.whole_seconds(mode) else mode
            longest = min(seconds, seg.segment_seconds(mode))
            _check_context(state, [C.n_audio_tokens(int(longest * C.SAMPLE_RATE))], instruction, gen, None)
            if mode == "none":
                job.submit(Request(audio=source, prompt=instruction, options=gen,
                                   sample_rate=C.SAMPLE_RATE if isinstance(source, np.ndarray) else None))
            else:
                job.segments(source, instruction, gen, mode)
        kind, payload = await first_event(job, request)
        if stream:
            return StreamingResponse(_transcript_stream(job, request, kind, payload), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        payload = await final_event(job, request, kind, payload)
        state.metrics.requests.labels(endpoint, "200").inc()
        return transcript_response(payload, fmt, seconds, language if isinstance(language, str) else None, temperature,
                                    JSONResponse, PlainTextResponse)

    async def _transcript_stream(job: Job, request: HttpRequest, kind: str, payload: Any) -> AsyncIterator[bytes]:
        text: list[str] = []
        try:
            while True:
                if kind == "text" or kind == "segment":
                    piece = payload if kind == "text" else (" " if text else "") + payload.text.strip()
                    text.append(piece)
                    yield sse({"type": "transcript.text.delta", "delta": piece})
                elif kind == "done":
                    done: dict[str, Any] = {"type": "transcript.text.done", "text": "".join(text)}
                    if isinstance(payload, Result):
                        done["usage"] = transcript_usage(payload)
                    yield sse(done)
                    state.metrics.requests.labels("/v1/audio/transcriptions", "200").inc()
                    return
                else:  # an error after the first text: OpenAI's streamed error object
                    yield sse(payload.body())
                    state.metrics.requests.labels("/v1/audio/transcriptions", str(payload.status)).inc()
                    return
                kind, payload = await next_event(job, request)
        finally:
            job.cancel()  # no-op once it has finished; frees the slot of a client that left

    # -- chat completions -----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest) -> Any:
        endpoint = "/v1/chat/completions"
        with new_job(state) as job:
            try:
                body = await request.json()
            except Exception as e:
                raise ApiError(400, f"the request body must be JSON: {e}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            messages, clips = chat_messages(body.get("messages"), options.max_upload_bytes)
            if sum(len(c) for c in clips) > options.max_upload_bytes:
                raise ApiError(413, f"the request's audio is larger than the server's limit of {options.max_upload_mb:g} MB",
                               param="messages", code="upload_too_large")
            gen, stream, include_usage = chat_options(body)
            probed = [await asyncio.to_thread(probe, c, f"audio part {k + 1}", options.max_audio_s) for k, c in enumerate(clips)]
            if sum(s for _, s in probed) > options.max_audio_s:
                raise ApiError(413, f"the request's audio ({sum(s for _, s in probed):.1f} s) is longer than the server's limit of "
                               f"{options.max_audio_s:g} s", param="messages", code="audio_too_long")
            counts = [C.n_audio_tokens(int(round(s * C.SAMPLE_RATE))) for _, s in probed]
            _check_context(state, counts, "", gen, messages)
            sources = tuple(src for src, _ in probed)
            job.submit(Request(audio=sources, prompt="", options=gen, messages=messages,
                               sample_rate=C.SAMPLE_RATE if any(isinstance(s, np.ndarray) for s in sources) else None))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        kind, payload = await first_event(job, request)
        if stream:
            return StreamingResponse(_chat_stream(job, request, kind, payload, cid, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        res: Result = await final_event(job, request, kind, payload)
        state.metrics.requests.labels(endpoint, "200").inc()
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text, "refusal": None},
                             "finish_reason": finish_reason(res), "logprobs": None}],
                "usage": chat_usage(res), "system_fingerprint": None}

    async def _chat_stream(job: Job, request: HttpRequest, kind: str, payload: Any, cid: str, created: int,
                           include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if kind == "text":
                    yield chunk({"content": payload})
                elif kind == "done":
                    yield chunk({}, finish_reason(payload))
                    if include_usage:
                        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                                    "choices": [], "usage": chat_usage(payload)})
                    yield b"data: [DONE]\n\n"
                    state.metrics.requests.labels("/v1/chat/completions", "200").inc()
                    return
                else:
                    yield sse(payload.body())
                    state.metrics.requests.labels("/v1/chat/completions", str(payload.status)).inc()
                    return
                kind, payload = await next_event(job, request)
        finally:
            job.cancel()

    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "mdl-edge",
            "encoder": state.lm.encoder_variant, "decoder": state.lm.decoder_variant}


async def _read_limited(upload: Any, limit: int, name: str) -> bytes:
    """An upload's bytes, refused (413) as soon as it passes ``limit``."""
    chunks, total = [], 0
    while True:
        chunk = await upload.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"{name}: the upload is larger than the server's limit of {limit / 2**20:g} MB", param="file",
                           code="upload_too_large")
        chunks.append(chunk)
    if not total:
        raise ApiError(400, f"{name}: the file is empty (0 bytes)", param="file", code="invalid_audio")
    return b"".join(chunks)


def _check_context(state: ServerState, counts: list[int], prompt: str, gen: GenerationOptions,
                   messages: list[dict[str, Any]] | None) -> None:
    try:
        need = state.lm.positions_needed(counts, prompt or CAPTION_PROMPT, gen, messages)
    except MdlEdgeError as e:
        raise ApiError(400, one_line(e), param="messages") from None
    limit = state.lm.decoder.max_positions
    if need > limit:
        raise ApiError(400, f"this request needs {need} positions (its audio is {sum(counts)} tokens, plus text and "
                       f"max_tokens {gen.max_new_tokens}) but the model holds {limit}; shorten the audio or max_tokens",
                       param="messages", code="context_length_exceeded")


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
