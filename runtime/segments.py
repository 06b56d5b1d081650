"""Long recordings: voice activity, cut points, timed segments (torch-free).

A recording is cut into segments the model handles well, each answered as its own clip. Under
``auto`` a recording up to ``max_segment`` seconds (30: MiDashengLM is evaluated on clips of up
to 30 s) is answered whole, for captions and transcripts alike; a longer one is cut: transcription
at pauses found by voice activity detection, a segment never longer than ``max_segment``, a cut
forced at the maximum only where no pause exists, pauses longer than ``max_pause`` left out; captioning in windows of about ``window``
seconds, each ended at the quietest moment of its last 40% rather than at a hard cut. Audio
arrives block by block (see ``runtime/audio.py``) and segments leave as soon as they close, so
memory holds at most one segment (or the first ``max_segment`` seconds) and one block, whatever
the duration.

Voice activity comes from WebRTC's VAD (``webrtcvad-wheels``: a small C library, no torch and no
second copy of ggml beside llama.cpp's; see the README for the measurement behind the choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from . import constants as C
from .errors import MdlEdgeError, OptionError

VAD_FRAME = 480  # 30 ms at 16 kHz: the longest frame WebRTC's VAD takes
MODES = ("auto", "vad", "window", "none")


@dataclass(frozen=True, kw_only=True)
class SegmentOptions:
    """How a recording is cut. ``mode``: ``"vad"`` (at pauses, at most ``max_segment`` s),
    ``"window"`` (windows of at most ``window`` s, each ended at a quiet moment), ``"none"`` (the
    whole clip, as one request), ``"auto"`` (a recording up to ``max_segment`` s whole; longer
    ones: transcription vad, captioning window). A clip no longer than :meth:`whole_seconds` is
    one segment, answered exactly as the whole clip. ``min_pause``: the shortest silence a vad cut
    may use; ``max_pause``: a longer silence is left out of a cut recording's vad segments, but
    for ``pause_margin`` seconds of it at each side (None: segments tile the recording, pauses
    and all); ``aggressiveness``: WebRTC VAD's 0-3 (higher calls less audio speech)."""

    mode: str = "auto"
    max_segment: float = 30.0
    window: float = 10.0
    min_pause: float = 0.3
    # faster-whisper's VAD filter leaves out silences of 2 s and more, keeping 0.4 s at each side
    # (its VadOptions defaults): a segment of a few words in a long silence is answered on the
    # words, not on the silence, which costs time and which a model can answer with made-up text
    max_pause: float | None = 2.0
    pause_margin: float = 0.4
    aggressiveness: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError("segment", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_segment", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= v <= 600.0:
                raise OptionError(name, f"must be between 1 and 600 seconds, got {v!r}")
        if isinstance(self.min_pause, bool) or not isinstance(self.min_pause, (int, float)) or not 0.03 <= self.min_pause <= 5.0:
            raise OptionError("min_pause", f"must be between 0.03 and 5 seconds, got {self.min_pause!r}")
        if isinstance(self.pause_margin, bool) or not isinstance(self.pause_margin, (int, float)) or not 0.0 <= self.pause_margin <= 5.0:
            raise OptionError("pause_margin", f"must be between 0 and 5 seconds, got {self.pause_margin!r}")
        if self.max_pause is not None and (isinstance(self.max_pause, bool) or not isinstance(self.max_pause, (int, float))
                                           or not 2 * self.pause_margin < self.max_pause <= 600.0):
            raise OptionError("max_pause", f"must be more than twice pause_margin ({2 * self.pause_margin:g} s) and at most 600 s, "
                              f"or None to keep every pause, got {self.max_pause!r}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise OptionError("aggressiveness", f"must be 0, 1, 2 or 3, got {self.aggressiveness!r}")

    def resolved(self, task: str) -> str:
        """The mode for a task (``"transcribe"`` or anything else)."""
        return ("vad" if task == "transcribe" else "window") if self.mode == "auto" else self.mode

    def whole_seconds(self, mode: str) -> float:
        """The longest recording answered whole under resolved ``mode``: ``max_segment`` under
        ``auto`` (both tasks) and ``vad``, the window under an explicit ``window``; no limit for
        ``none``. The CLI, the server and the cluster path all decide by it."""
        if mode == "none":
            return float("inf")
        return self.window if mode == "window" and self.mode != "auto" else self.max_segment

    def cuts(self, mode: str, n_samples: int | None) -> bool:
        """Whether a recording of ``n_samples`` (None: its header does not tell) is segmented
        under resolved ``mode``: never under ``none``; always under an explicit ``vad`` or
        ``window`` (the answer is timed segments); under ``auto`` when it is longer than
        :meth:`whole_seconds` (an unknown length is answered whole)."""
        if mode == "none":
            return False
        return self.mode != "auto" or (n_samples is not None and n_samples > self.whole_seconds(mode) * C.SAMPLE_RATE)

    def segment_seconds(self, mode: str) -> float:
        """The longest segment a cut recording gets under resolved ``mode``."""
        return self.window if mode == "window" else self.max_segment if mode == "vad" else float("inf")


@dataclass(frozen=True)
class TimedSegment:
    """One answered segment: start and end in seconds from the start of the file."""

    index: int
    start: float
    end: float
    text: str
    token_ids: tuple[int, ...] = ()
    stop_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class VoiceActivity:
    """WebRTC's VAD over 30 ms frames of 16 kHz float audio."""

    def __init__(self, aggressiveness: int = 2) -> None:
        try:
            import webrtcvad
        except ImportError as e:
            raise MdlEdgeError(f"segmenting at pauses needs webrtcvad-wheels (pip install webrtcvad-wheels): {e}") from e
        self._vad = webrtcvad.Vad(aggressiveness)

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """Speech (True) per whole 30 ms frame of ``samples``."""
        n = samples.size // VAD_FRAME
        pcm = (np.clip(samples[: n * VAD_FRAME], -1.0, 1.0) * 32767).astype("<i2").reshape(n, VAD_FRAME)
        return np.fromiter((self._vad.is_speech(f.tobytes(), C.SAMPLE_RATE) for f in pcm), bool, count=n)


def _cut_at_pause(speech: np.ndarray, min_frames: int) -> int | None:
    """Frame index to cut at: the middle of the last silence run of at least ``min_frames``
    frames that is not at the very start; None if there is none."""
    best = None
    run = 0
    for i in range(speech.size):
        if not speech[i]:
            run += 1
            continue
        if run >= min_frames and i - run > 0:
            best = i - run // 2 - (run % 2)
        run = 0
    if run >= min_frames and speech.size - run > 0:
        best = speech.size - run // 2 - (run % 2)
    return best


def _quiet_cut(samples: np.ndarray) -> int:
    """Where a caption window of ``samples`` ends: the quietest 30 ms (lowest energy) among the
    frame ends in its last 40%, the latest of equals (so silence is cut at the full window)."""
    limit = samples.size
    ends = np.arange(limit, int(limit * 0.6), -VAD_FRAME)  # from the full window backwards
    energy = np.array([float(np.mean(np.square(samples[e - VAD_FRAME : e], dtype=np.float64))) for e in ends])
    return int(ends[int(np.argmin(energy))])


def _leading_quiet(speech: np.ndarray) -> int:
    """Frames of silence at the start of ``speech``."""
    hits = np.flatnonzero(speech)
    return int(hits[0]) if hits.size else int(speech.size)


def _long_pause(speech: np.ndarray, min_frames: int) -> int | None:
    """The first frame of the first silence run of at least ``min_frames`` frames that follows
    speech (it may still be going on at the end); None if there is none."""
    run = 0
    heard = False
    for i in range(speech.size):
        if speech[i]:
            heard, run = True, 0
            continue
        run += 1
        if heard and run >= min_frames:
            return i + 1 - run
    return None


def segment_stream(blocks: Iterable[np.ndarray], options: SegmentOptions, mode: str) -> Iterator[tuple[int, np.ndarray]]:
    """Cut a stream of 16 kHz mono blocks into ``(first sample, samples)`` segments, yielded as
    each closes. ``mode``: ``"vad"``, ``"window"`` or ``"none"`` (resolved already); a recording
    no longer than ``options.whole_seconds(mode)`` is one segment. Once a recording is cut, vad
    segments leave out pauses longer than ``options.max_pause`` but for ``pause_margin`` at each
    side, and a stretch without speech gives no segment (a recording with none at all gives one,
    its last ``pause_margin``, so that every recording is answered)."""
    limit = int(round(min(options.segment_seconds(mode), 1e6) * C.SAMPLE_RATE))
    whole = int(round(min(options.whole_seconds(mode), 1e6) * C.SAMPLE_RATE))
    vad = VoiceActivity(options.aggressiveness) if mode == "vad" else None
    min_frames = max(1, int(round(options.min_pause * C.SAMPLE_RATE / VAD_FRAME)))
    skipping = vad is not None and options.max_pause is not None
    margin = int(round(options.pause_margin * C.SAMPLE_RATE / VAD_FRAME))
    long_frames = int(round((options.max_pause or 0.0) * C.SAMPLE_RATE / VAD_FRAME))
    buf = np.zeros(0, np.float32)
    start = 0
    cutting = False  # set once the recording is known to be longer than `whole`
    yielded = False
    speech = np.zeros(0, bool)  # per whole VAD frame of buf
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, np.float32)])
        if vad is not None:
            done = speech.size * VAD_FRAME
            new = vad.frames(buf[done : (buf.size // VAD_FRAME) * VAD_FRAME])
            speech = np.concatenate([speech, new])
        cutting = cutting or (mode != "none" and buf.size > whole)
        while cutting:
            if skipping:
                drop = _leading_quiet(speech) - margin  # quiet before the next speech, but the margin
                if drop > 0:
                    start, buf, speech = start + drop * VAD_FRAME, buf[drop * VAD_FRAME :], speech[drop:]
            # a long pause that has begun within the segment's limit ends it (a streamed
            # recording finds it there before its buffer exceeds the limit)
            pause = _long_pause(speech[: limit // VAD_FRAME], long_frames) if skipping else None
            if pause is not None:
                cut = (pause + margin) * VAD_FRAME
            elif buf.size > limit:
                if vad is not None:
                    cut_frame = _cut_at_pause(speech[: limit // VAD_FRAME], min_frames)
                    cut = cut_frame * VAD_FRAME if cut_frame else limit
                else:
                    cut = _quiet_cut(buf[:limit])
            else:
                break
            yield start, buf[:cut]
            yielded = True
            start += cut
            buf = buf[cut:]
            if vad is not None:
                speech = speech[cut // VAD_FRAME :] if cut % VAD_FRAME == 0 else vad.frames(buf[: (buf.size // VAD_FRAME) * VAD_FRAME])
    if cutting and skipping and speech.any():
        last = int(np.flatnonzero(speech)[-1])
        buf = buf[: (last + 1 + margin) * VAD_FRAME] if last + 1 + margin < speech.size else buf
    elif cutting and skipping and yielded:
        return  # the quiet after the last speech
    if buf.size or start == 0:
        yield start, buf
