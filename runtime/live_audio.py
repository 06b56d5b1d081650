"""The audio side of a live stream (torch-free): an open stretch of audio (an utterance, a caption
window) turned into the log-mel as it arrives and encoded chunk by chunk, reusing finished chunks;
and a real-time player for files (``--realtime``, tests, benchmarks)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from . import constants as C
from .encoder import chunk_plan
from .mel import LogMelStream

if TYPE_CHECKING:
    from .pipeline import AudioLM


class OpenSegment:
    """An open stretch of audio (an utterance, a caption window): its samples, its log-mel so
    far, and the encoder features of its finished chunks."""

    def __init__(self, item: int, start: int, acoustic_mels: int, threads: int) -> None:
        self.item, self.start = item, start
        self.parts: list[np.ndarray] = []
        self.n = 0
        self.mel = LogMelStream(acoustic_mels=acoustic_mels, n_threads=threads)
        self.frames: list[np.ndarray] = []  # final raw frames (not touched by the end padding)
        self.n_fed = 0
        self.known: dict[int, tuple[object, float, np.ndarray]] = {}  # chunk -> (spec, its lowest raw dB, features)
        self.partial_seq = 0
        self.last_partial_at = 0  # samples when the last partial was taken
        self.speech_end: int | None = None  # stream sample where its speech ended (transcription)

    def add(self, samples: np.ndarray) -> None:
        self.parts.append(samples)
        self.n += samples.size

    def samples(self) -> np.ndarray:
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts)]
        return self.parts[0] if self.parts else np.zeros(0, np.float32)

    def embeddings(self, lm: AudioLM, *, final: bool) -> np.ndarray:
        """Audio embeddings of the samples so far, reusing finished chunks' features."""
        wave = self.samples()
        if self.n_fed < self.n:
            self.frames.append(self.mel.feed(wave[self.n_fed :]))
            self.n_fed = self.n
        tail, peak = (self.mel.finish(), self.mel.peak) if final else self.mel.peek_finish()
        raw = np.concatenate([*self.frames, tail], axis=1)
        n_final = raw.shape[1] - tail.shape[1]
        mel = raw.copy()
        np.maximum(mel[: C.N_MELS], np.float32(peak - C.TOP_DB), out=mel[: C.N_MELS])
        n = max(self.n, C.MIN_SAMPLES)
        plan = chunk_plan(n)
        # a chunk's features depend on the peak only where top_db clamps: reused while no frame of it is clamped
        floor = peak - C.TOP_DB
        reuse = {c for c, spec in enumerate(plan) if c in self.known and self.known[c][0] == spec and self.known[c][1] >= floor}
        fresh = lm.encoder.chunk_features(mel, self.n, skip=reuse)
        feats = []
        for c, spec in enumerate(plan):
            f = self.known[c][2] if c in reuse else fresh[c]
            feats.append(f)
            end = spec.first_frame + spec.n_real * C.PATCH_FRAMES
            if c not in reuse and end <= n_final:
                self.known[c] = (spec, float(raw[: C.N_MELS, spec.first_frame : end].min()), f)
        return lm.encoder.project(np.concatenate(feats))


def paced(blocks: Iterable[np.ndarray], sample_rate: int, *, block_seconds: float = 0.1, speed: float = 1.0) -> Iterator[np.ndarray]:
    """``blocks`` re-cut into pieces of ``block_seconds``, each released when a real-time player
    (``speed`` times faster) would have played it: a file streamed as a microphone would be."""
    step = max(1, int(round(block_seconds * sample_rate)))
    t0 = time.perf_counter()
    done = 0
    rest = np.zeros(0, np.float32)
    for block in blocks:
        rest = np.concatenate([rest, block]) if rest.size else np.asarray(block)
        while rest.shape[0] >= step:
            piece, rest = rest[:step], rest[step:]
            done += step
            wait = t0 + done / sample_rate / speed - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            yield piece
    if rest.shape[0]:
        wait = t0 + (done + rest.shape[0]) / sample_rate / speed - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        yield rest
