"""The server's HTTP handlers (the ``server`` extra): each reads the shared
:class:`~mdl_edge.runtime.server.ServerState` from ``request.app.state.mdl``, turns OpenAI's
request into a job (``runtime/jobs.py``) and the job's events into OpenAI's response
(``runtime/wire.py``). :func:`~mdl_edge.runtime.server.create_app` routes to them.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
import asyncio
import secrets
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from . import constants as C
from .audio import AudioSource, expected_samples, iter_audio
from .errors import AudioError, MdlEdgeError, OptionError, one_line
from .jobs import ClientGone, Job, final_event, first_event, new_job, next_event
from .options import GenerationOptions, SamplingOptions
from .pipeline import Request as ModelRequest
from .pipeline import Result
from .prompt import CAPTION_PROMPT, transcribe_prompt
from .wire import (RESPONSE_FORMATS, ApiError, ChatChunks, TranscriptEvents, chat_completion, chat_messages, chat_options, flag,
                   number, sse, transcript_response)

if TYPE_CHECKING:
    from .server import ServerState

STATIC = Path(__file__).with_name("static")
TRANSCRIPTIONS = "/v1/audio/transcriptions"
CHAT = "/v1/chat/completions"


def state_of(request: Request) -> "ServerState":
    return request.app.state.mdl


def _count(state: "ServerState", endpoint: str, status: int | str) -> None:
    state.metrics.requests.labels(endpoint, str(status)).inc()


# -- errors and the guard ---------------------------------------------------------------------------
def error_response(state: "ServerState", e: ApiError, endpoint: str) -> Any:
    _count(state, endpoint, e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def on_api_error(request: Request, e: ApiError) -> Any:
    return error_response(state_of(request), e, request.url.path)


async def on_client_gone(request: Request, e: ClientGone) -> Any:
    _count(state_of(request), request.url.path, 499)
    return Response(status_code=499)


async def on_invalid(request: Request, e: RequestValidationError) -> Any:
    return error_response(state_of(request), ApiError(400, f"invalid request: {e.errors()}"), request.url.path)


def refusal(state: "ServerState", path: str, method: str, headers: dict[bytes, bytes]) -> ApiError | None:
    """Why a request is refused before its handler runs (API key, declared body size), or None."""
    options = state.options
    if options.api_key and (path.startswith("/v1/") or path == "/metrics"):
        if not secrets.compare_digest(headers.get(b"authorization", b""), f"Bearer {options.api_key}".encode()):
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
            state = scope["app"].state.mdl
            err = refusal(state, scope["path"], scope["method"], dict(scope["headers"]))
            if err is not None:
                await error_response(state, err, scope["path"])(scope, receive, send)
                return
        await self.inner(scope, receive, send)


# -- plain endpoints --------------------------------------------------------------------------------
async def page() -> Any:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


async def health(request: Request) -> Any:
    state = state_of(request)
    s = state.engine.status()
    return {"status": "ok", "model": state.model_id, "slots": s.slots, "slots_busy": s.active,
            "in_progress": state.in_progress, "auth": state.options.api_key is not None}


async def models(request: Request) -> Any:
    return {"object": "list", "data": [_model_card(state_of(request))]}


async def model(request: Request, model_id: str) -> Any:
    state = state_of(request)
    if model_id != state.model_id:
        raise ApiError(404, f"the model {model_id!r} does not exist (this server serves {state.model_id!r})",
                       param="model", code="model_not_found")
    return _model_card(state)


async def metrics(request: Request) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: "ServerState") -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "mdl-edge",
            "encoder": state.lm.encoder_variant, "decoder": state.lm.decoder_variant}


# -- the model endpoints ----------------------------------------------------------------------------
async def transcriptions(request: Request) -> Any:
    """OpenAI's ``/v1/audio/transcriptions``: a multipart upload, answered whole or cut into timed
    segments as ``--segment`` says, in any of OpenAI's response formats or streamed."""
    state = state_of(request)
    with new_job(state) as job:
        form = await _form(request, state.options.max_upload_bytes)
        fmt = str(form.get("response_format") or "json")
        if fmt not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r}", param="response_format")
        stream = flag(form.get("stream") or "false", "stream")
        if stream and fmt not in ("json", "text"):
            raise ApiError(400, "stream=true gives text deltas; use response_format json or text with it", param="stream")
        if any(g != "segment" for g in form.getlist("timestamp_granularities[]")):
            raise ApiError(400, "only segment timestamps are available (timestamp_granularities[]=segment)",
                           param="timestamp_granularities[]")
        language = form.get("language") if isinstance(form.get("language"), str) and form.get("language") else None
        try:
            instruction = transcribe_prompt(language)
        except OptionError as e:
            raise ApiError(400, one_line(e), param="language") from None
        if isinstance(form.get("prompt"), str) and form["prompt"].strip():
            instruction = form["prompt"]
        temperature = number(form.get("temperature") or 0, "temperature", 0, 2)
        gen = GenerationOptions(sampling=SamplingOptions(temperature=temperature))
        source, seconds = await asyncio.to_thread(probe, form["data"], form["name"], state.options.max_audio_s)
        seg = state.options.segmenting
        mode = seg.resolved("transcribe")
        mode = "none" if seconds <= seg.whole_seconds(mode) else mode
        longest = min(seconds, seg.segment_seconds(mode))
        _check_context(state, [C.n_audio_tokens(int(longest * C.SAMPLE_RATE))], instruction, gen, None)
        if mode == "none":
            job.submit(ModelRequest(audio=source, prompt=instruction, options=gen, sample_rate=_rate_of([source])))
        else:
            job.segments(source, instruction, gen, mode)
    kind, payload = await first_event(job, request)
    if stream:
        return _streamed(job, request, kind, payload, TranscriptEvents(), TRANSCRIPTIONS)
    payload = await final_event(job, request, kind, payload)
    _count(state, TRANSCRIPTIONS, 200)
    return transcript_response(payload, fmt, seconds, language, temperature, JSONResponse, PlainTextResponse)


async def chat(request: Request) -> Any:
    """OpenAI's ``/v1/chat/completions`` with audio parts (``input_audio`` or ``data:`` URLs)."""
    state = state_of(request)
    options = state.options
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
        _check_context(state, [C.n_audio_tokens(int(round(s * C.SAMPLE_RATE))) for _, s in probed], "", gen, messages)
        sources = tuple(src for src, _ in probed)
        job.submit(ModelRequest(audio=sources, prompt="", options=gen, messages=messages, sample_rate=_rate_of(sources)))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    kind, payload = await first_event(job, request)
    if stream:
        return _streamed(job, request, kind, payload, ChatChunks(cid, created, state.model_id, include_usage), CHAT)
    res: Result = await final_event(job, request, kind, payload)
    _count(state, CHAT, 200)
    return chat_completion(res, cid, created, state.model_id)


# -- streaming --------------------------------------------------------------------------------------
class SseFormat(Protocol):
    """How one protocol writes a job's events (``runtime/wire.py`` has one per endpoint)."""

    def opening(self) -> list[bytes]: ...
    def delta(self, kind: str, payload: Any) -> bytes: ...
    def done(self, payload: Any) -> list[bytes]: ...


def _streamed(job: Job, request: Request, kind: str, payload: Any, fmt: SseFormat, endpoint: str) -> Any:
    return StreamingResponse(_events(job, request, kind, payload, fmt, endpoint), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(job: Job, request: Request, kind: str, payload: Any, fmt: SseFormat, endpoint: str) -> AsyncIterator[bytes]:
    """A job's events as server-sent events, in ``fmt``'s protocol; an error after the first text
    goes out as OpenAI's streamed error object. The job is cancelled if the client leaves."""
    state = state_of(request)
    try:
        for chunk in fmt.opening():
            yield chunk
        while kind in ("text", "segment"):
            yield fmt.delta(kind, payload)
            kind, payload = await next_event(job, request)
        if kind == "done":
            for chunk in fmt.done(payload):
                yield chunk
            _count(state, endpoint, 200)
        else:
            yield sse(payload.body())
            _count(state, endpoint, payload.status)
    finally:
        job.cancel()  # no-op once it has finished; frees the slot of a client that left


# -- parameters -------------------------------------------------------------------------------------
async def _form(request: Request, limit: int) -> dict[str, Any]:
    """The multipart form of a transcription with the upload read (up to ``limit``) and its
    temporary file closed: the fields, plus ``data`` and ``name``."""
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as e:  # a body that is not multipart form data
        raise ApiError(400, f"the request must be multipart/form-data with a 'file' part: {e}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the 'file' part (the audio) is missing", param="file")
        name = Path(upload.filename or "upload").name
        data = await _read_limited(upload, limit, name)
    finally:
        await form.close()
    return _Form(form, data=data, name=name)


class _Form(dict):
    """A form's fields as a dict (the last value of a repeated field), with ``getlist``."""

    def __init__(self, form: Any, **extra: Any) -> None:
        super().__init__({k: form.get(k) for k in form.keys()}, **extra)
        self._lists = {k: form.getlist(k) for k in form.keys()}

    def getlist(self, key: str) -> list[Any]:
        return list(self._lists.get(key, []))


def _rate_of(sources: Any) -> int | None:
    """Decoded samples (a container without a duration header) are 16 kHz; files say their own rate."""
    return C.SAMPLE_RATE if any(isinstance(s, np.ndarray) for s in sources) else None


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


def _check_context(state: "ServerState", counts: list[int], prompt: str, gen: GenerationOptions,
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
