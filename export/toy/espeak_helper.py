"""The espeak-ng helper process (standard library only; started by ``export/toy/espeak.py`` as
``python -I espeak_helper.py``) and the wire format both sides share.

It initialises libespeak-ng once and loads the English tables, then for each request (a JSON
line ``[text, voice, speed, pitch]`` on stdin) forks a child that speaks the text from that
freshly initialised state and hands the int16 samples back through a pipe; the reply on stdout
is :data:`HEADER` then the payload (:data:`COUNT`: the word count, each word's first sample as
espeak-ng's word events give it; :data:`COUNT` again: the phoneme count, each phoneme's first
sample and its :data:`PHONEME_NAME` bytes as the phoneme events give them; then the samples).
The first reply carries the sample rate (or why the library could not start). The engine carries state from one utterance to the next, which the fork
discards: every word comes out as ``espeak-ng -v VOICE -s SPEED -p PITCH`` would say it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import sys

#: Reply framing: (status: 0 payload is speech or the rate / 1 payload is an error message, payload bytes).
HEADER = struct.Struct("<ii")
#: A speech payload opens with the word count and that many int32 word starts, then the phoneme
#: count, that many int32 phoneme starts and as many phoneme names; the int16 samples follow.
COUNT = struct.Struct("<i")
#: A phoneme's name: espeak-ng's ASCII mnemonic ("aU", "@2", "_:"), NUL-padded.
PHONEME_NAME = 8

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a missing data folder instead of calling exit()
_INITIALIZE_PHONEME_EVENTS = 0x0001  # events only: the samples stay the program's (tests/test_toy.py)
_RATE, _PITCH = 1, 3
_POS_CHARACTER = 1
_SYNTH_FLAGS = 0x0 | 0x100 | 0x1000  # espeakCHARS_AUTO | espeakPHONEMES | espeakENDPAUSE, as the program sets them
_EVENT_END_OF_LIST, _EVENT_WORD, _EVENT_PHONEME = 0, 1, 7


class _Event(ctypes.Structure):
    """speak_lib.h's espeak_EVENT."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int), ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def _reply(status: int, payload: bytes) -> None:
    sys.stdout.buffer.write(HEADER.pack(status, len(payload)) + payload)
    sys.stdout.buffer.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _speak_in_child(lib: ctypes.CDLL, w: int, text: str, voice: str, speed: int, pitch: int) -> None:
    """In the forked child: one utterance, its samples written to ``w``; never returns."""
    code = 1
    try:
        parts: list[bytes] = []
        starts: list[int] = []
        phonemes: list[tuple[int, bytes]] = []

        def collect(wav, n: int, events) -> int:
            if wav and n > 0:
                parts.append(ctypes.string_at(wav, 2 * n))
            k = 0
            while events and events[k].type != _EVENT_END_OF_LIST:
                if events[k].type == _EVENT_WORD:
                    starts.append(events[k].sample)  # the word's first sample in the output
                elif events[k].type == _EVENT_PHONEME:
                    phonemes.append((events[k].sample, bytes(events[k].id)))
                k += 1
            return 0

        callback = _CALLBACK(collect)
        lib.espeak_SetSynthCallback(callback)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"no voice {voice!r}")
        lib.espeak_SetParameter(_RATE, speed, 0)
        lib.espeak_SetParameter(_PITCH, pitch, 0)
        data = text.encode()
        if lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _SYNTH_FLAGS, None, None) != 0:
            raise ValueError("espeak_Synth failed")
        lib.espeak_Synchronize()
        head = COUNT.pack(len(starts)) + struct.pack(f"<{len(starts)}i", *starts) + COUNT.pack(len(phonemes))
        head += struct.pack(f"<{len(phonemes)}i", *(p for p, _ in phonemes)) + b"".join(n.ljust(PHONEME_NAME, b"\0") for _, n in phonemes)
        _write_all(w, head + b"".join(parts))
        code = 0
    except BaseException as e:  # the message goes back on the pipe; the parent reports it
        try:
            _write_all(w, str(e).encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def main() -> None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_DONT_EXIT | _INITIALIZE_PHONEME_EVENTS)
        if rate <= 0:
            raise OSError(f"espeak_Initialize failed ({rate})")
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        # The English dictionary and phoneme tables, loaded once here rather than by every
        # child (5 ms each); the samples stay the program's (tests/test_toy.py).
        lib.espeak_SetVoiceByName(b"en")
    except (OSError, AttributeError) as e:
        _reply(1, str(e).encode())
        return
    _reply(0, str(rate).encode())
    for line in sys.stdin.buffer:
        text, voice, speed, pitch = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _speak_in_child(lib, w, text, voice, int(speed), int(pitch))
        os.close(w)
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.close(r)
        payload = b"".join(chunks)
        _, status = os.waitpid(pid, 0)
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        _reply(0 if ok else 1, payload if ok or payload else f"the synthesis process died (status {status})".encode())


if __name__ == "__main__":
    main()
