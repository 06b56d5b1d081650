"""A stand-in for the ``sounddevice`` package in ``mdl-edge live --mic`` tests (this machine has
no capture device): one input device that plays the WAV file named by ``$FAKE_MIC_WAV`` through
the stream's callback at real-time pace, in blocks of ``blocksize``, then interrupts the process
as a user's Ctrl-C would. Only what ``runtime/live_cli.py`` calls is here."""

from __future__ import annotations

import os
import signal
import threading
import time

import soundfile as sf


class PortAudioError(Exception):
    pass


def query_devices():
    return [{"name": "fake microphone", "max_input_channels": 1, "default_samplerate": 16000.0}]


class InputStream:
    def __init__(self, *, samplerate, channels, dtype, device, blocksize, callback) -> None:
        if device not in (None, 0, "fake microphone"):
            raise PortAudioError(f"Error querying device {device}")
        wave, rate = sf.read(os.environ["FAKE_MIC_WAV"], dtype="float32")
        if rate != samplerate:
            raise PortAudioError(f"Invalid sample rate {samplerate} (the fake microphone plays {rate} Hz)")
        self.wave, self.rate, self.block, self.callback = wave.reshape(-1, 1), rate, blocksize, callback
        self._thread = threading.Thread(target=self._play, daemon=True)

    def _play(self) -> None:
        t0 = time.perf_counter()
        for i in range(0, self.wave.shape[0], self.block):
            time.sleep(max(0.0, t0 + (i + self.block) / self.rate - time.perf_counter()))
            self.callback(self.wave[i : i + self.block], self.block, None, None)
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> "InputStream":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        pass
