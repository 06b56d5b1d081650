"""OpenAI's Realtime transcription API over a WebSocket: ``/v1/realtime?intent=transcription``.

The events and shapes are those of OpenAI's Realtime API (what the official ``openai`` client's
``client.realtime.connect`` speaks):

- client -> server: ``session.update`` (``session.type = "transcription"``; ``audio.input.format``
  ``audio/pcm`` at 24 kHz, or ``audio/pcmu`` / ``audio/pcma`` at 8 kHz; ``audio.input.transcription``
  ``language`` and ``prompt``; ``audio.input.turn_detection``: ``server_vad`` with ``threshold``,
  ``prefix_padding_ms``, ``silence_duration_ms``, or null for commits by the client),
  ``input_audio_buffer.append`` / ``commit`` / ``clear``.
- server -> client: ``session.created`` / ``session.updated``, ``input_audio_buffer.speech_started``
  / ``speech_stopped`` / ``committed`` / ``cleared``,
  ``conversation.item.input_audio_transcription.delta`` and ``.completed`` (and ``.failed``), ``error``.

Where the model differs, it says so in its own events (documented in docs/server.md):
MiDashengLM is not a streaming model, so the open utterance is re-decoded for partial results and
its text may change: ``mdl_edge.transcription.partial`` carries each whole partial (a page
replaces the line). As with OpenAI's own models, ``delta`` events stream the committed
utterance's transcript as it is decoded, and ``.completed`` carries all of it. ``?intent=caption`` opens
a caption session instead: fixed windows, ``mdl_edge.caption.partial`` and
``mdl_edge.caption.completed``. Rates other than OpenAI's (``audio/pcm`` with ``rate`` 8000-48000)
are taken too.

Limits: ``ServerOptions.max_realtime`` open connections (more are refused with an ``error`` and
close code 1013), ``max_realtime_buffer_s`` seconds of audio buffered per connection (a client
sending faster than it is processed is slowed: its messages are read as room frees), and one
``append`` of at most :data:`MAX_APPEND_BYTES`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket  # the server extra: this module is imported by the server's app alone

from . import g711
from .errors import MdlEdgeError, OptionError

if TYPE_CHECKING:
    from .live import LiveEvent, LiveOptions, LiveSession
    from .server import ServerState

logger = logging.getLogger("mdl_edge")

PATH = "/v1/realtime"
INTENTS = ("transcription", "caption")
MAX_APPEND_BYTES = 15 << 20  # OpenAI's limit for one append
PCM_RATES = (8000, 48000)  # the audio/pcm rates taken (OpenAI's own: 24000)
_INSECURE_KEY = "openai-insecure-api-key."  # browsers send the key as a WebSocket subprotocol
_ids = itertools.count(1)
#: OpenAI's server VAD defaults, what a session starts with and what an update fills in
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def error_event(message: str, *, code: str, param: str | None = None, event_id: str | None = None,
                kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's ``error`` server event."""
    return {"type": "error", "event_id": f"event_{next(_ids)}",
            "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}}


def decode_audio(data: bytes, fmt: str) -> np.ndarray:
    """An ``append``'s bytes -> int16 samples (PCM16 little-endian, or G.711 expanded)."""
    if fmt in g711.TABLES:
        return g711.decode(data, fmt)
    if len(data) % 2:
        raise ValueError(f"audio/pcm is 16-bit samples: {len(data)} bytes is not a whole number of them")
    return np.frombuffer(data, "<i2")


# -- the session's settings ----------------------------------------------------------------------------
class Settings:
    """What ``session.update`` has set, and OpenAI's session object for it."""

    def __init__(self, intent: str) -> None:
        self.intent = intent
        self.format, self.rate = "audio/pcm", 24000
        self.language: str | None = None
        self.prompt: str | None = None
        self.turn_detection: dict[str, Any] | None = dict(SERVER_VAD)
        self.model = "mdl-edge"

    def update(self, session: Any) -> None:
        """Apply a ``session.update``'s ``session`` (raises :class:`OptionError` naming the field)."""
        if not isinstance(session, dict):
            raise OptionError("session", "must be an object")
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise OptionError("session.type", f"this server transcribes: 'transcription', got {kind!r}")
        inp = ((session.get("audio") or {}).get("input")) or {}
        if not isinstance(inp, dict):
            raise OptionError("session.audio.input", "must be an object")
        fmt = inp.get("format")
        if fmt is not None:
            kind = fmt.get("type", "audio/pcm") if isinstance(fmt, dict) else None
            if kind not in ("audio/pcm", *g711.TABLES):
                raise OptionError("session.audio.input.format.type", f"must be audio/pcm, audio/pcmu or audio/pcma, got {kind!r}")
            rate = fmt.get("rate", 24000) if kind == "audio/pcm" else 8000
            if isinstance(rate, bool) or not isinstance(rate, int) or not PCM_RATES[0] <= rate <= PCM_RATES[1]:
                raise OptionError("session.audio.input.format.rate", f"must be a whole number of Hz in {PCM_RATES[0]}-{PCM_RATES[1]}, got {rate!r}")
            self.format, self.rate = kind, rate
        tr = inp.get("transcription")
        if isinstance(tr, dict):
            self.language = tr.get("language") or None
            self.prompt = tr.get("prompt") or None
            self.model = str(tr.get("model") or self.model)
        if "turn_detection" in inp:
            td = inp["turn_detection"]
            if td is not None:
                if not isinstance(td, dict) or td.get("type", "server_vad") != "server_vad":
                    raise OptionError("session.audio.input.turn_detection.type", "this server detects turns with server_vad (or null: commits by the client)")
                td = {**(self.turn_detection or SERVER_VAD), **{k: v for k, v in td.items() if v is not None}}
            self.turn_detection = td
        self.live_options()  # validated now, where it was set

    def live_options(self) -> "LiveOptions":
        from .live import LiveOptions
        from .options import GenerationOptions

        td = self.turn_detection
        kw: dict[str, Any] = {"task": "caption" if self.intent == "caption" else "transcribe", "language": self.language,
                              "generation": GenerationOptions(max_new_tokens=128), "vad": td is not None}
        if td is not None:
            threshold = float(td.get("threshold", 0.5))
            if not 0.0 <= threshold <= 1.0:
                raise OptionError("session.audio.input.turn_detection.threshold", f"must be between 0 and 1, got {threshold}")
            # WebRTC's VAD has four modes rather than a probability: a higher threshold calls less audio speech
            kw.update(aggressiveness=min(3, int(threshold * 4)), prefix_padding=float(td.get("prefix_padding_ms", 300)) / 1000,
                      silence=float(td.get("silence_duration_ms", 500)) / 1000)
        return LiveOptions(**kw)

    def session(self, session_id: str) -> dict[str, Any]:
        fmt: dict[str, Any] = {"type": self.format, **({"rate": self.rate} if self.format == "audio/pcm" else {})}
        return {"type": "transcription", "id": session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt, "transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
                                    "turn_detection": self.turn_detection, "noise_reduction": None}},
                "include": None}


class Connection:
    """One client's WebSocket: its settings, its live session, and the events it is sent."""

    def __init__(self, ws: WebSocket, state: "ServerState", intent: str) -> None:
        self.ws, self.state, self.intent = ws, state, intent
        self.id = f"sess_{secrets.token_hex(8)}"
        self.settings = Settings(intent)
        self.live: LiveSession | None = None
        self.offset_ms = 0  # the clock of earlier live sessions (a session.update restarts it)
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.sent: dict[int, str] = {}  # item -> text sent as deltas so far
        self.spaces: dict[int, str] = {}  # item -> whitespace held back (the transcript is stripped)
        self.previous_item: str | None = None

    def item_id(self, item: int) -> str:
        return f"item_{self.id[5:]}_{self.offset_ms}_{item}"

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event for the client (from any thread)."""
        event = {"event_id": f"event_{next(_ids)}", **event}  # an event made with its own id keeps it
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, event)

    def error(self, message: str, *, code: str, param: str | None = None, event_id: str | None = None,
              kind: str = "invalid_request_error") -> None:
        self.send(error_event(message, code=code, param=param, event_id=event_id, kind=kind))

    # -- the live session ----------------------------------------------------------------------------
    def start_live(self) -> "LiveSession":
        from .live import LiveSession

        if self.live is None:
            options = dataclasses.replace(self.settings.live_options(), max_buffered=self.state.options.max_realtime_buffer_s)
            self.live = LiveSession(self.state.engine, options, sample_rate=self.settings.rate, on_event=self.on_live, name=self.id)
        return self.live

    async def end_live(self, *, cancel: bool = False) -> None:
        live, self.live = self.live, None
        if live is None:
            return
        if cancel:
            await asyncio.to_thread(live.cancel)
            return
        await asyncio.to_thread(live.finish)
        self.offset_ms += int(round(live.stats.audio_seconds * 1000))

    def on_live(self, ev: "LiveEvent") -> None:
        """A live event -> OpenAI's events (on the session's or the engine's thread)."""
        item = self.item_id(ev.item)
        start_ms, end_ms = self.offset_ms + int(round(ev.start * 1000)), self.offset_ms + int(round(ev.end * 1000))
        caption = self.intent == "caption"
        if ev.type == "speech_started":
            self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": start_ms, "item_id": item})
        elif ev.type == "speech_stopped":
            self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item})
            self.send({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": self.previous_item})
            self.previous_item = item
        elif ev.type == "partial":
            if caption:
                self.send({"type": "mdl_edge.caption.partial", "item_id": item, "caption": ev.text, "audio_start_ms": start_ms,
                           "audio_end_ms": end_ms})
                return
            self.send({"type": "mdl_edge.transcription.partial", "item_id": item, "text": ev.text, "audio_start_ms": start_ms,
                       "audio_end_ms": end_ms})
        elif ev.type == "final_delta":
            if not caption:
                self._delta(ev.item, item, ev.text)
        elif ev.type == "final":
            if caption:
                self.send({"type": "mdl_edge.caption.completed", "item_id": item, "caption": ev.text, "audio_start_ms": start_ms,
                           "audio_end_ms": end_ms})
                return
            sent = self.sent.pop(ev.item, "")
            self.spaces.pop(ev.item, None)
            if ev.text.startswith(sent) and len(ev.text) > len(sent):  # what the pieces did not carry (a trimmed stop string)
                self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item, "content_index": 0,
                           "delta": ev.text[len(sent):]})
            self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item, "content_index": 0,
                       "transcript": ev.text, "audio_start_ms": start_ms, "audio_end_ms": end_ms,
                       "usage": {"type": "tokens", "input_tokens": ev.audio_tokens, "output_tokens": ev.output_tokens,
                                 "total_tokens": ev.audio_tokens + ev.output_tokens,
                                 "input_token_details": {"audio_tokens": ev.audio_tokens, "text_tokens": 0}}})
        elif ev.type == "dropped":
            self.error(f"the server could not keep up: {ev.end - ev.start:.2f} s of audio at {ev.start:.2f} s were dropped",
                       code="audio_dropped", kind="server_error")
        elif ev.type == "error":
            if ev.item >= 0:
                self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item, "content_index": 0,
                           "error": {"type": "server_error", "code": "transcription_failed", "message": ev.text}})
            else:
                self.error(ev.text, code="live_stream_failed", kind="server_error")

    def _delta(self, n: int, item: str, piece: str) -> None:
        """Send a piece of item ``n``'s final text as OpenAI's delta, leading and trailing
        whitespace held back so that the deltas add up to the (stripped) transcript."""
        text = self.spaces.get(n, "") + piece
        if n not in self.sent:
            text = text.lstrip()
        body = text.rstrip()
        self.spaces[n] = text[len(body):]
        if body:
            self.sent[n] = self.sent.get(n, "") + body
            self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item, "content_index": 0, "delta": body})

    # -- client events ----------------------------------------------------------------------------------
    async def handle(self, message: str) -> None:
        try:
            event = json.loads(message)
        except json.JSONDecodeError as e:
            self.error(f"not JSON: {e}", code="invalid_json")
            return
        if not isinstance(event, dict):
            self.error("an event is a JSON object", code="invalid_event")
            return
        kind, event_id = event.get("type"), event.get("event_id")
        if kind == "session.update":
            try:
                self.settings.update(event.get("session"))
            except OptionError as e:
                self.error(e.detail, code="invalid_value", param=e.option, event_id=event_id)
                return
            await self.end_live()  # audio so far keeps the settings it was sent under
            self.send({"type": "session.updated", "session": self.settings.session(self.id)})
        elif kind == "input_audio_buffer.append":
            await self.append(event.get("audio"), event_id)
        elif kind == "input_audio_buffer.commit":
            if self.live is None:
                self.error("the input audio buffer is empty", code="input_audio_buffer_commit_empty", event_id=event_id)
                return
            self.live.commit()  # speech_stopped, committed and the transcript follow from the live session
        elif kind == "input_audio_buffer.clear":
            if self.live is not None:
                self.live.clear()
            self.send({"type": "input_audio_buffer.cleared"})
        else:
            self.error(f"unsupported event type {kind!r} (this server takes session.update and input_audio_buffer.*)",
                       code="unknown_event", event_id=event_id)

    async def append(self, audio: Any, event_id: str | None) -> None:
        if not isinstance(audio, str):
            self.error("input_audio_buffer.append needs audio: base64 text", code="invalid_value", param="audio", event_id=event_id)
            return
        if len(audio) > MAX_APPEND_BYTES * 4 // 3 + 4:
            self.error(f"one append takes at most {MAX_APPEND_BYTES >> 20} MB of audio", code="audio_too_large", param="audio",
                       event_id=event_id)
            return
        try:
            samples = decode_audio(base64.b64decode(audio, validate=True), self.settings.format)
        except (binascii.Error, ValueError) as e:
            self.error(f"audio: {e}", code="invalid_audio", param="audio", event_id=event_id)
            return
        if samples.size == 0:
            return
        live = self.start_live()
        try:  # waits while the connection's buffer is full: the client is read no faster than it is heard
            await asyncio.to_thread(live.push, samples, timeout=60.0)
        except MdlEdgeError as e:
            self.error(str(e), code="live_stream_failed", kind="server_error", event_id=event_id)


async def realtime(ws: WebSocket) -> None:
    """The ``/v1/realtime`` WebSocket handler."""
    from starlette.websockets import WebSocketDisconnect

    state: ServerState = ws.app.state.mdl
    options = state.options
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    if options.api_key:
        header = ws.headers.get("authorization", "")
        key = next((p[len(_INSECURE_KEY):] for p in offered if p.startswith(_INSECURE_KEY)), None)
        if not (secrets.compare_digest(header, f"Bearer {options.api_key}") or (key is not None and secrets.compare_digest(key, options.api_key))):
            await ws.close(code=1008, reason="invalid or missing API key")
            return
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    intent = ws.query_params.get("intent", "transcription")
    if intent not in INTENTS:
        await ws.send_json(error_event(f"this server opens intent=transcription or intent=caption sessions, not {intent!r}",
                                       code="invalid_intent", param="intent"))
        await ws.close(code=1008)
        return
    if not state.open_realtime():
        await ws.send_json(error_event(f"the server has {options.max_realtime} realtime connections open, its limit; try again later",
                                       code="server_overloaded", kind="server_error"))
        await ws.close(code=1013)
        return
    conn = Connection(ws, state, intent)
    conn.send({"type": "session.created", "session": conn.settings.session(conn.id)})

    async def sender() -> None:
        while True:
            event = await conn.outbox.get()
            if event is None:
                return
            await ws.send_json(event)

    out = asyncio.create_task(sender())
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                conn.error("events are JSON text frames", code="invalid_event")
                continue
            await conn.handle(text)
    except WebSocketDisconnect:
        pass
    except Exception:  # reported to the log; the connection closes
        logger.exception("%s: realtime connection failed", conn.id)
    finally:
        await conn.end_live(cancel=True)  # the client is gone: nobody reads its results
        out.cancel()
        state.close_realtime()
