"""Live transcription over `mdl-edge serve`'s Realtime WebSocket with the official OpenAI client:
a file is sent as a microphone would send it (24 kHz PCM16, 100 ms a message) and committed at
its end (no turn detection: the client says when the utterance ends); partials print as they
come, then the final transcript. Starts a server on a free local port unless --url
names a running one.
    python examples/realtime_client.py [AUDIO] [--model BUNDLE | --url http://127.0.0.1:8080] [--api-key KEY] [--pace 1]"""

import argparse
import base64
import threading
import time

import numpy as np
from _synthetic import clip_files, tiny_bundle
from openai import OpenAI

from mdl_edge.runtime.audio import load_audio
from mdl_edge.runtime.server import Server, ServerOptions

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model")
ap.add_argument("--url", help="a server that is already running")
ap.add_argument("--api-key", default="-")
ap.add_argument("--pace", type=float, default=4.0, help="times faster than real time (1: as a microphone)")
args = ap.parse_args()

import soxr  # noqa: E402 (after the arguments: --help needs nothing)

wave = load_audio(args.audio or clip_files()[2])
pcm = (np.clip(soxr.resample(wave, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


def talk(url: str) -> None:
    client = OpenAI(base_url=url + "/v1", api_key=args.api_key)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}})

        def send() -> None:
            step = 4800  # 100 ms of 24 kHz PCM16
            for i in range(0, len(pcm), step):
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + step]).decode())
                time.sleep(0.1 / args.pace)
            conn.input_audio_buffer.commit()  # the utterance ends here: its final follows

        threading.Thread(target=send, daemon=True).start()
        for event in conn:
            if event.type == "mdl_edge.transcription.partial":
                print(f"  partial {event.text!r}")
            elif event.type == "conversation.item.input_audio_transcription.completed":
                print(f"final [{event.audio_start_ms / 1000:.2f}-{event.audio_end_ms / 1000:.2f} s] {event.transcript!r}")
                break
            elif event.type == "error":
                print("error:", event.error.message)
                break


if args.url:
    talk(args.url)
else:
    with Server(args.model or tiny_bundle(), ServerOptions(port=0, parallel=2)) as server:
        talk(server.url)
