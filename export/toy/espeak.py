"""espeak-ng speech for the toy world, without starting the program once per word.

The toy world speaks tens of thousands of phrases and single words; starting ``espeak-ng`` for
each costs about 13 ms, nearly all of it start-up. A helper process (``export/toy/espeak_helper.py``)
keeps the engine (``libespeak-ng``, installed with the program by the Debian package) initialised
and forks a fresh child per utterance, so each is still spoken from a just-started engine and its
samples are the program's own (``tests/test_toy.py`` compares them); the library also reports
where each word and each phoneme starts, which the program cannot. Where no helper can run (no
``fork``, no library), the program is run per utterance instead, without word or phoneme places.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ...runtime.errors import MdlEdgeError
from .espeak_helper import COUNT, HEADER, PHONEME_NAME

logger = logging.getLogger("mdl_edge")


def available() -> bool:
    """Whether espeak-ng (the program) is installed; the library comes with it."""
    return shutil.which("espeak-ng") is not None


class Speech(NamedTuple):
    """One utterance as espeak-ng renders it."""

    samples: np.ndarray  # int16
    rate: int
    word_starts: tuple[int, ...] | None  # each word's first sample (espeak-ng's word events); None from the program
    phonemes: tuple[tuple[str, int], ...] | None = None  # each phoneme's mnemonic and first sample (phoneme events); None from the program


def synthesize(text: str, voice: str, speed: int, pitch: int, *, use_helper: bool = True) -> Speech:
    """espeak-ng's rendering of ``text`` as ``espeak-ng -v VOICE -s SPEED -p PITCH`` makes it, with
    the word starts where the library runs (the program does not report them)."""
    if not available():
        raise MdlEdgeError("espeak-ng is not installed (apt-get install espeak-ng): the toy world's speech comes from it")
    if use_helper:
        with _borrow_helper() as helper:
            if helper is not None:
                return helper.synth(text, voice, speed, pitch)
    return _run_program(text, voice, speed, pitch)


def _run_program(text: str, voice: str, speed: int, pitch: int) -> Speech:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        # -w writes a WAV with its true length (--stdout declares a 2 GB data chunk)
        out = f"{tmp}/speech.wav"
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", out, text], capture_output=True)
        if proc.returncode != 0:
            raise MdlEdgeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
        wave, rate = sf.read(out, dtype="int16")
    return Speech(wave, int(rate), None)


class _Helper:
    """The one owner of a helper process (``espeak_helper.py``): requests go in as JSON lines,
    samples come back framed by :data:`HEADER`. Used by one caller at a time (see
    :func:`_borrow_helper`)."""

    def __init__(self) -> None:
        # -I: the standard library only, so the process that forks per word stays small
        script = Path(__file__).with_name("espeak_helper.py")
        self.proc = subprocess.Popen([sys.executable, "-I", str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.owner = os.getpid()
        status, payload = self._read()
        if status != 0:
            self.close()
            raise OSError(payload.decode(errors="replace"))
        self.rate = int(payload.decode())

    def _read(self) -> tuple[int, bytes]:
        assert self.proc.stdout is not None
        head = self.proc.stdout.read(HEADER.size)
        if len(head) < HEADER.size:
            raise OSError(f"the espeak-ng helper exited (code {self.proc.poll()})")
        status, n = HEADER.unpack(head)
        return status, self.proc.stdout.read(n)

    def synth(self, text: str, voice: str, speed: int, pitch: int) -> Speech:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([text, voice, int(speed), int(pitch)]) + "\n").encode())
        self.proc.stdin.flush()
        status, payload = self._read()
        if status != 0:
            raise MdlEdgeError(f"espeak-ng could not say {text!r} with voice {voice!r}: {payload.decode(errors='replace')}")
        (n_words,) = COUNT.unpack_from(payload)
        at = COUNT.size
        starts = np.frombuffer(payload, np.int32, n_words, at)
        at += 4 * n_words
        (n_phonemes,) = COUNT.unpack_from(payload, at)
        at += COUNT.size
        phoneme_starts = np.frombuffer(payload, np.int32, n_phonemes, at)
        at += 4 * n_phonemes
        names = [payload[at + k * PHONEME_NAME : at + (k + 1) * PHONEME_NAME].rstrip(b"\0").decode("ascii", "replace") for k in range(n_phonemes)]
        samples = np.frombuffer(payload, np.int16, offset=at + PHONEME_NAME * n_phonemes).copy()
        return Speech(samples, self.rate, tuple(int(x) for x in starts), tuple(zip(names, (int(x) for x in phoneme_starts))))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the helper exits at end of input
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# Helpers are handed out through a queue, one per concurrent caller (the clip generator's
# worker threads), so that syntheses run side by side.
_idle: "queue.SimpleQueue[_Helper]" = queue.SimpleQueue()
_started: list[_Helper] = []
_helper_failed = False
_helper_guard = threading.Lock()


@contextlib.contextmanager
def _borrow_helper() -> Iterator[_Helper | None]:
    global _helper_failed
    helper = None
    while helper is None:
        try:
            candidate = _idle.get_nowait()
        except queue.Empty:
            break
        # One inherited through a fork of this process talks on its parent's pipes; one whose
        # process ended serves no one: both are left behind.
        if candidate.owner == os.getpid() and candidate.proc.poll() is None:
            helper = candidate
    if helper is None:
        with _helper_guard:
            if not _helper_failed and hasattr(os, "fork"):
                try:
                    helper = _Helper()
                    _started.append(helper)
                except OSError as e:
                    logger.info("espeak-ng library helper unavailable (%s); running the program per word", e)
                    _helper_failed = True
    try:
        yield helper
    finally:
        if helper is not None:
            _idle.put(helper)


@atexit.register
def _close_helpers() -> None:
    for helper in _started:
        if helper.owner == os.getpid():
            helper.close()
