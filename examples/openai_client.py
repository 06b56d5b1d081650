"""Talk to `mdl-edge serve` with the official OpenAI client: a streamed transcription and a
question about a clip. Starts a server on a free local port unless --url names a running one.
    python examples/openai_client.py [AUDIO] [--model BUNDLE | --url http://127.0.0.1:8080] [--api-key KEY]"""

import argparse
import base64
from pathlib import Path

from _synthetic import clip_files, tiny_bundle
from openai import OpenAI

from mdl_edge.runtime.server import Server, ServerOptions

ap = argparse.ArgumentParser()
ap.add_argument("audio", nargs="?")
ap.add_argument("--model")
ap.add_argument("--url", help="a server that is already running")
ap.add_argument("--api-key", default="-")
args = ap.parse_args()
audio = Path(args.audio) if args.audio else clip_files()[0]


def talk(url: str) -> None:
    client = OpenAI(base_url=url + "/v1", api_key=args.api_key)
    print("models:", [m.id for m in client.models.list().data])
    print("transcription: ", end="", flush=True)
    with audio.open("rb") as f:
        for event in client.audio.transcriptions.create(file=f, model="mdl", stream=True):
            if event.type == "transcript.text.delta":
                print(event.delta, end="", flush=True)
    print()
    data = base64.b64encode(audio.read_bytes()).decode()
    reply = client.chat.completions.create(model="mdl", max_tokens=24, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What sound is heard?"}, {"type": "input_audio", "input_audio": {"data": data, "format": audio.suffix[1:]}}]}])
    usage = reply.usage
    print(f"answer: {reply.choices[0].message.content!r} ({usage.prompt_tokens_details.audio_tokens} audio tokens, "
          f"{usage.completion_tokens} new)")


if args.url:
    talk(args.url)
else:
    with Server(args.model or tiny_bundle(), ServerOptions(port=0, parallel=2)) as server:
        talk(server.url)
