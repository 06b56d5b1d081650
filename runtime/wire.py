"""OpenAI's wire format as the local server speaks it: request parameters and message parts in,
responses, usage, error objects and server-sent-event chunks out. Nothing here runs a model
(torch-free, no web framework)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from typing import Any

from .errors import AudioError, ConfigError, ContextLengthError, MdlEdgeError, OptionError, one_line
from .options import GenerationOptions, SamplingOptions
from .pipeline import Result
from .segments import TimedSegment
from .writers import SegmentWriter

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)", re.S)


class ApiError(Exception):
    """An error answered as OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: MdlEdgeError, param: str | None = None) -> ApiError:
    if isinstance(e, AudioError):
        return ApiError(400, one_line(e), param=param or "file", code="invalid_audio")
    if isinstance(e, OptionError):
        return ApiError(400, one_line(e), param=getattr(e, "option", None), code="invalid_value")
    if isinstance(e, ContextLengthError):
        return ApiError(400, one_line(e), code="context_length_exceeded")
    if isinstance(e, ConfigError):
        return ApiError(400, one_line(e), code="invalid_value")
    return ApiError(500, one_line(e), type="server_error")


def number(value: Any, param: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{param} must be a number, got {value!r}", param=param) from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise ApiError(400, f"{param} must be between {lo:g} and {hi:g}, got {value!r}", param=param)
    return x


def integer(value: Any, param: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ApiError(400, f"{param} must be an integer >= {lo}, got {value!r}", param=param)
    return value


def flag(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(400, f"{param} must be true or false, got {value!r}", param=param)


def stop_strings(value: Any) -> tuple[str, ...]:
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


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class TranscriptEvents:
    """The SSE events of a streamed transcription: ``transcript.text.delta`` per piece of text (a
    segment of a long recording is one piece), then ``transcript.text.done`` with the whole text."""

    def __init__(self) -> None:
        self._text: list[str] = []

    def opening(self) -> list[bytes]:
        return []

    def delta(self, kind: str, payload: Any) -> bytes:
        piece = payload if kind == "text" else (" " if self._text else "") + payload.text.strip()
        self._text.append(piece)
        return sse({"type": "transcript.text.delta", "delta": piece})

    def done(self, payload: Any) -> list[bytes]:
        done: dict[str, Any] = {"type": "transcript.text.done", "text": "".join(self._text)}
        if isinstance(payload, Result):
            done["usage"] = transcript_usage(payload)
        return [sse(done)]


class ChatChunks:
    """The SSE events of a streamed chat completion: ``chat.completion.chunk`` objects (the role
    first, then content deltas, then the finish reason and, when asked, usage), then ``[DONE]``."""

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        self._head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        self._include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**self._head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    def opening(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, kind: str, payload: Any) -> bytes:
        return self._chunk({"content": payload})

    def done(self, payload: Any) -> list[bytes]:
        out = [self._chunk({}, finish_reason(payload))]
        if self._include_usage:
            out.append(sse({**self._head, "choices": [], "usage": chat_usage(payload)}))
        return out + [b"data: [DONE]\n\n"]


def chat_completion(res: Result, cid: str, created: int, model: str) -> dict[str, Any]:
    """A whole (non-streamed) chat completion object."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text, "refusal": None},
                         "finish_reason": finish_reason(res), "logprobs": None}],
            "usage": chat_usage(res), "system_fingerprint": None}


def chat_options(body: dict[str, Any]) -> tuple[GenerationOptions, bool, bool]:
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
    max_new = integer(limit, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 1) \
        if limit is not None else GenerationOptions().max_new_tokens
    temperature = number(body.get("temperature", 0) if body.get("temperature") is not None else 0, "temperature", 0, 2)
    top_p = number(body.get("top_p", 1) if body.get("top_p") is not None else 1, "top_p", 1e-9, 1)
    seed = body.get("seed")
    if seed is not None:
        integer(seed, "seed", -(2**63))
    stream = flag(body.get("stream", False) if body.get("stream") is not None else False, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    try:
        sampling = SamplingOptions(temperature=temperature, top_p=top_p, seed=seed or 0)
        gen = GenerationOptions(max_new_tokens=max_new, sampling=sampling, stop=stop_strings(body.get("stop")))
    except OptionError as e:
        raise ApiError(400, one_line(e), param=e.option) from None
    return gen, stream, bool(stream_options.get("include_usage"))


def finish_reason(res: Result) -> str:
    return "length" if res.stop_reason == "max_new_tokens" else "stop"


def chat_usage(res: Result) -> dict[str, Any]:
    n_out = len(res.token_ids)
    return {"prompt_tokens": res.n_prompt, "completion_tokens": n_out, "total_tokens": res.n_prompt + n_out,
            "prompt_tokens_details": {"audio_tokens": res.n_audio_tokens, "cached_tokens": res.n_prompt - res.n_evaluated},
            "completion_tokens_details": {"audio_tokens": 0, "reasoning_tokens": 0}}


def transcript_usage(res: Result) -> dict[str, Any]:
    n_out = len(res.token_ids)
    return {"type": "tokens", "input_tokens": res.n_prompt, "output_tokens": n_out, "total_tokens": res.n_prompt + n_out,
            "input_token_details": {"audio_tokens": res.n_audio_tokens, "text_tokens": res.n_prompt - res.n_audio_tokens}}


def transcript_response(payload: Result | list[TimedSegment], fmt: str, seconds: float, language: str | None,
                         temperature: float, json_response: Any, text_response: Any) -> Any:
    if isinstance(payload, Result):
        segs = [payload.as_segment()]
        usage: dict[str, Any] = transcript_usage(payload)
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
