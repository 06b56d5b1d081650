"""``mdl-edge serve``: OpenAI's audio API on a local HTTP server (the ``server`` extra).

Apps in any language embed captioning and transcription by talking to ``127.0.0.1`` with the
client library they already have. Built on FastAPI + uvicorn (what llama-cpp-python's and vLLM's
OpenAI servers use): asyncio streaming with disconnect detection, multipart uploads through
python-multipart (spooled by Starlette to anonymous temporary files, closed after the upload is
read), and prometheus-client for the metrics text format.

One :class:`~mdl_edge.runtime.engine.Engine` holds the bundle's decoder: requests that overlap
decode together (continuous batching), each HTTP request is a job whose text arrives through an
asyncio queue, and a client that goes away cancels its job (its slot frees before the next
token). Admission is bounded: ``parallel`` running plus ``max_queue`` waiting; beyond that a
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
import base64
import binascii
import dataclasses
import io
import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np

from . import constants as C
from .audio import AudioSource, expected_samples, iter_audio
from .engine import Engine, Ticket
from .errors import AudioError, ConfigError, ContextLengthError, MdlEdgeError, OptionError, one_line
from .options import DecoderOptions, EncoderOptions, GenerationOptions, SamplingOptions, decoder_options, default_parallel, whole_number
from .pipeline import AudioLM, Request, Result
from .prompt import CAPTION_PROMPT, transcribe_prompt
from .segments import SegmentOptions, TimedSegment
from .writers import SegmentWriter

logger = logging.getLogger("mdl_edge")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
#: Decoder positions per slot by default: a 5-minute clip (1500 audio tokens) with its prompt and
#: a 256-token answer fits one (Qwen3-0.6B's f16 cache: 0.23 GB per slot; Qwen2-7B's: 0.11 GB).
CTX_PER_SLOT = 2048
STATIC = Path(__file__).with_name("static")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)", re.S)


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


class ApiError(Exception):
    """An error answered as OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_runtime(e: MdlEdgeError, param: str | None = None) -> ApiError:
    if isinstance(e, AudioError):
        return ApiError(400, one_line(e), param=param or "file", code="invalid_audio")
    if isinstance(e, OptionError):
        return ApiError(400, one_line(e), param=getattr(e, "option", None), code="invalid_value")
    if isinstance(e, ContextLengthError):
        return ApiError(400, one_line(e), code="context_length_exceeded")
    if isinstance(e, ConfigError):
        return ApiError(400, one_line(e), code="invalid_value")
    return ApiError(500, one_line(e), type="server_error")


# -- parameters -----------------------------------------------------------------------------------
def _number(value: Any, param: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{param} must be a number, got {value!r}", param=param) from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise ApiError(400, f"{param} must be between {lo:g} and {hi:g}, got {value!r}", param=param)
    return x


def _integer(value: Any, param: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ApiError(400, f"{param} must be an integer >= {lo}, got {value!r}", param=param)
    return value


def _flag(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(400, f"{param} must be true or false, got {value!r}", param=param)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(stops)


def audio_bytes(part: dict[str, Any], param: str, limit: int) -> bytes:
    """The bytes of an ``input_audio`` or ``audio_url`` content part (``data:`` URLs only: the
    server never fetches a remote address)."""
    if part.get("type") == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise ApiError(400, "input_audio must be an object with base64 'data' and a 'format'", param=f"{param}.input_audio")
        encoded = spec["data"]
        if encoded.startswith("data:"):  # some clients send a data URL here too
            return audio_bytes({"type": "audio_url", "audio_url": {"url": encoded}}, param, limit)
        return _b64(encoded, f"{param}.input_audio.data", limit)
    spec = part.get("audio_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise ApiError(400, "audio_url must be an object with a 'url'", param=f"{param}.audio_url")
    m = _DATA_URL.fullmatch(url) if url.startswith("data:") else None
    if m is None:
        raise ApiError(400, "audio_url must be a data: URL (data:audio/wav;base64,...); this server does not fetch remote audio",
                       param=f"{param}.audio_url", code="invalid_url")
    if not m.group("b64"):
        raise ApiError(400, "audio_url data: URLs must be base64-encoded", param=f"{param}.audio_url")
    return _b64(m.group("data"), f"{param}.audio_url", limit)


def _b64(text: str, param: str, limit: int) -> bytes:
    if len(text) * 3 // 4 > limit:
        raise ApiError(413, f"{param}: the audio is larger than the server's limit of {limit / 2**20:g} MB", param=param,
                       code="upload_too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param} is not valid base64: {e}", param=param, code="invalid_audio") from None
    if not data:
        raise ApiError(400, f"{param}: the audio is empty (0 bytes)", param=param, code="invalid_audio")
    return data


def chat_messages(messages: Any, limit: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """OpenAI chat messages -> the chat template's messages (an ``{"type": "audio"}`` item per
    audio part) and the audio parts' bytes, in order."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    clips: list[bytes] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name for the system turn
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant, got {role!r}", param=f"messages[{i}].role")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts", param=f"messages[{i}].content")
        items: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                items.append({"type": "text", "text": part["text"]})
            elif kind in ("input_audio", "audio_url"):
                clips.append(audio_bytes(part, param, limit))
                items.append({"type": "audio"})
            else:
                raise ApiError(400, f"{param}: unsupported content part {kind!r} (text, input_audio and audio_url are)", param=param)
        out.append({"role": role, "content": items})
    return out, clips


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
@dataclass
class _Job:
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
                self.post("error", _from_runtime(out))
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
                self.post("error", _from_runtime(e))
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


async def _next_event(job: _Job, request: Any, every: float = 0.25) -> tuple[str, Any]:
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
def _new_job(state: ServerState) -> Iterator[_Job]:
    """Admit a request (503 when full) and open its job; a request that fails before its work is
    handed over releases its place at once."""
    state.admit()
    job = _Job(state, asyncio.get_running_loop())
    try:
        yield job
    except BaseException:
        job.end()
        raise


async def _first_event(job: _Job, request: Any) -> tuple[str, Any]:
    """The first event: an error before any text is an ordinary HTTP error, not a stream."""
    kind, payload = await _next_event(job, request)
    if kind == "error":
        raise payload
    return kind, payload


async def _final(job: _Job, request: Any, kind: str, payload: Any) -> Any:
    """Read the events up to the end; the final payload."""
    while kind != "done":
        kind, payload = await _next_event(job, request)
        if kind == "error":
            raise payload
    return payload


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


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
        with _new_job(state) as job:
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
            stream = _flag(form.get("stream") or "false", "stream")
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
            temperature = _number(form.get("temperature") or 0, "temperature", 0, 2)
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
        kind, payload = await _first_event(job, request)
        if stream:
            return StreamingResponse(_transcript_stream(job, request, kind, payload), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        payload = await _final(job, request, kind, payload)
        state.metrics.requests.labels(endpoint, "200").inc()
        return _transcript_response(payload, fmt, seconds, language if isinstance(language, str) else None, temperature,
                                    JSONResponse, PlainTextResponse)

    async def _transcript_stream(job: _Job, request: HttpRequest, kind: str, payload: Any) -> AsyncIterator[bytes]:
        text: list[str] = []
        try:
            while True:
                if kind == "text" or kind == "segment":
                    piece = payload if kind == "text" else (" " if text else "") + payload.text.strip()
                    text.append(piece)
                    yield _sse({"type": "transcript.text.delta", "delta": piece})
                elif kind == "done":
                    done: dict[str, Any] = {"type": "transcript.text.done", "text": "".join(text)}
                    if isinstance(payload, Result):
                        done["usage"] = _transcript_usage(payload)
                    yield _sse(done)
                    state.metrics.requests.labels("/v1/audio/transcriptions", "200").inc()
                    return
                else:  # an error after the first text: OpenAI's streamed error object
                    yield _sse(payload.body())
                    state.metrics.requests.labels("/v1/audio/transcriptions", str(payload.status)).inc()
                    return
                kind, payload = await _next_event(job, request)
        finally:
            job.cancel()  # no-op once it has finished; frees the slot of a client that left

    # -- chat completions -----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest) -> Any:
        endpoint = "/v1/chat/completions"
        with _new_job(state) as job:
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
            gen, stream, include_usage = _chat_options(body)
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
        kind, payload = await _first_event(job, request)
        if stream:
            return StreamingResponse(_chat_stream(job, request, kind, payload, cid, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        res: Result = await _final(job, request, kind, payload)
        state.metrics.requests.labels(endpoint, "200").inc()
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text, "refusal": None},
                             "finish_reason": _finish_reason(res), "logprobs": None}],
                "usage": _chat_usage(res), "system_fingerprint": None}

    async def _chat_stream(job: _Job, request: HttpRequest, kind: str, payload: Any, cid: str, created: int,
                           include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if kind == "text":
                    yield chunk({"content": payload})
                elif kind == "done":
                    yield chunk({}, _finish_reason(payload))
                    if include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                                    "choices": [], "usage": _chat_usage(payload)})
                    yield b"data: [DONE]\n\n"
                    state.metrics.requests.labels("/v1/chat/completions", "200").inc()
                    return
                else:
                    yield _sse(payload.body())
                    state.metrics.requests.labels("/v1/chat/completions", str(payload.status)).inc()
                    return
                kind, payload = await _next_event(job, request)
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


def _chat_options(body: dict[str, Any]) -> tuple[GenerationOptions, bool, bool]:
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "only n=1 is supported", param="n")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise ApiError(400, "only text output is supported (modalities: [\"text\"])", param="modalities")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not available from this server", param="logprobs")
    tools = body.get("tools")
    if tools:
        raise ApiError(400, "tools are not supported by this model", param="tools")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = _integer(limit, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 1) \
        if limit is not None else GenerationOptions().max_new_tokens
    temperature = _number(body.get("temperature", 0) if body.get("temperature") is not None else 0, "temperature", 0, 2)
    top_p = _number(body.get("top_p", 1) if body.get("top_p") is not None else 1, "top_p", 1e-9, 1)
    seed = body.get("seed")
    if seed is not None:
        _integer(seed, "seed", -(2**63))
    stream = _flag(body.get("stream", False) if body.get("stream") is not None else False, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    try:
        sampling = SamplingOptions(temperature=temperature, top_p=top_p, seed=seed or 0)
        gen = GenerationOptions(max_new_tokens=max_new, sampling=sampling, stop=_stop_strings(body.get("stop")))
    except OptionError as e:
        raise ApiError(400, one_line(e), param=e.option) from None
    return gen, stream, bool(stream_options.get("include_usage"))


def _finish_reason(res: Result) -> str:
    return "length" if res.stop_reason == "max_new_tokens" else "stop"


def _chat_usage(res: Result) -> dict[str, Any]:
    n_out = len(res.token_ids)
    return {"prompt_tokens": res.n_prompt, "completion_tokens": n_out, "total_tokens": res.n_prompt + n_out,
            "prompt_tokens_details": {"audio_tokens": res.n_audio_tokens, "cached_tokens": res.n_prompt - res.n_evaluated},
            "completion_tokens_details": {"audio_tokens": 0, "reasoning_tokens": 0}}


def _transcript_usage(res: Result) -> dict[str, Any]:
    n_out = len(res.token_ids)
    return {"type": "tokens", "input_tokens": res.n_prompt, "output_tokens": n_out, "total_tokens": res.n_prompt + n_out,
            "input_token_details": {"audio_tokens": res.n_audio_tokens, "text_tokens": res.n_prompt - res.n_audio_tokens}}


def _transcript_response(payload: Result | list[TimedSegment], fmt: str, seconds: float, language: str | None,
                         temperature: float, json_response: Any, text_response: Any) -> Any:
    if isinstance(payload, Result):
        segs = [payload.as_segment()]
        usage: dict[str, Any] = _transcript_usage(payload)
    else:
        segs = payload
        usage = {"type": "duration", "seconds": round(seconds, 3)}
    text = " ".join(s.text.strip() for s in segs if s.text.strip()) if len(segs) > 1 else segs[0].text if segs else ""
    if fmt == "json":
        return json_response({"text": text, "usage": usage})
    if fmt == "text":
        return text_response(text + "\n")
    if fmt in ("srt", "vtt"):
        out = io.StringIO()
        writer = SegmentWriter(out, fmt)
        for s in segs:
            writer.write(s)
        writer.close()
        return text_response(out.getvalue(), media_type="text/vtt" if fmt == "vtt" else "application/x-subrip")
    return json_response({
        "task": "transcribe", "language": language or "unknown", "duration": round(seconds, 3), "text": text,
        "segments": [{"id": s.index, "seek": int(round(s.start * 100)), "start": round(s.start, 3), "end": round(s.end, 3),
                      "text": s.text, "tokens": list(s.token_ids), "temperature": temperature,
                      "avg_logprob": None, "compression_ratio": None, "no_speech_prob": None} for s in segs],
        "usage": {"type": "duration", "seconds": round(seconds, 3)},
    })


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
