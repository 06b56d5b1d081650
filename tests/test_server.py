"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official ``openai`` client.

Every answer is checked against the runtime answering the same clip in-process (greedy, same
bundle and variants): the server adds transport, not different tokens.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install -e '.[server]')")
openai = pytest.importorskip("openai", reason="the dev extra is not installed")
httpx = pytest.importorskip("httpx")

import soundfile as sf  # noqa: E402

from conftest import chirp  # noqa: E402
from mdl_edge.runtime import constants as C  # noqa: E402
from mdl_edge.runtime.options import GenerationOptions  # noqa: E402
from mdl_edge.runtime.pipeline import AudioLM  # noqa: E402
from mdl_edge.runtime.prompt import CAPTION_PROMPT, TRANSCRIBE_PROMPT  # noqa: E402
from mdl_edge.runtime.segments import SegmentOptions  # noqa: E402
from mdl_edge.runtime.server import Server, ServerOptions  # noqa: E402
from mdl_edge.runtime.options import DecoderOptions

LM = dict(threads=2, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True))  # parity mode: the answers are compared token for token
KEY = "test-key-123"


def wav_bytes(x: np.ndarray, rate: int = C.SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()




@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    from mdl_edge.export.toy import world as toyworld

    if not toyworld.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    x = toyworld.speak("the train to the city leaves at noon", "en+f2", 160, 50)
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, x, C.SAMPLE_RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def lm(bundle):
    with AudioLM(bundle, **LM) as m:
        yield m


@pytest.fixture(scope="module")
def server(bundle):
    with Server(bundle, ServerOptions(port=0, parallel=4, api_key=KEY, max_upload_mb=2, max_audio_s=60,
                                      segmenting=SegmentOptions(max_segment=4.0)), **LM) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def expected(lm: AudioLM, audio, prompt: str, max_new_tokens: int = 256) -> str:
    return lm.generate(audio, prompt, GenerationOptions(max_new_tokens=max_new_tokens)).text


def chat_message(audio: bytes, text: str = CAPTION_PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}]}]


def wait_idle(server: Server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(server.url + "/health").json()
        if h["slots_busy"] == 0 and h["in_progress"] == 0:
            return h
        assert time.monotonic() < deadline, f"the server did not go idle: {h}"
        time.sleep(0.05)


# -- transcriptions --------------------------------------------------------------------------------
def test_transcription_every_response_format(client, lm, speech_wav) -> None:
    import srt
    import webvtt

    want = expected(lm, speech_wav, TRANSCRIBE_PROMPT)
    seconds = sf.info(str(speech_wav)).duration
    res = client.audio.transcriptions.create(file=speech_wav.open("rb"), model="any", response_format="json")
    assert res.text == want
    assert res.usage.type == "tokens" and res.usage.input_token_details.audio_tokens == C.n_audio_tokens(int(seconds * C.SAMPLE_RATE))
    assert client.audio.transcriptions.create(file=speech_wav.open("rb"), model="any", response_format="text").strip() == want.strip()
    verbose = client.audio.transcriptions.create(file=speech_wav.open("rb"), model="any", response_format="verbose_json",
                                                 timestamp_granularities=["segment"])
    assert verbose.text == want and abs(verbose.duration - seconds) < 1e-3
    assert len(verbose.segments) == 1 and verbose.segments[0].start == 0 and abs(verbose.segments[0].end - seconds) < 1e-3
    subs = list(srt.parse(client.audio.transcriptions.create(file=speech_wav.open("rb"), model="any", response_format="srt")))
    assert len(subs) == 1 and subs[0].start.total_seconds() == 0 and abs(subs[0].end.total_seconds() - seconds) < 1e-3
    assert subs[0].content == want.strip() or not want.strip()
    vtt = webvtt.from_buffer(io.StringIO(client.audio.transcriptions.create(file=speech_wav.open("rb"), model="any", response_format="vtt")))
    assert len(vtt.captions) == 1 and vtt.captions[0].start == "00:00:00.000"


def test_transcription_stream(client, lm, speech_wav) -> None:
    want = expected(lm, speech_wav, TRANSCRIBE_PROMPT)
    events = list(client.audio.transcriptions.create(file=speech_wav.open("rb"), model="any", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and len(deltas) == len(events) - 1
    assert "".join(deltas) == events[-1].text == want
    assert events[-1].usage.output_tokens > 0


def test_long_transcription_is_segmented_like_the_runtime(client, lm, speech_wav) -> None:
    """Longer than the server's max_segment (4 s): cut at pauses, each segment timed; the same
    segments and text as AudioLM.transcribe_segments with the same options."""
    x = sf.read(str(speech_wav), dtype="float32")[0]
    recording = np.concatenate([x, np.zeros(8000, np.float32), x[::-1], np.zeros(8000, np.float32), x])
    want = list(lm.transcribe_segments(recording, sample_rate=C.SAMPLE_RATE, segmenting=SegmentOptions(max_segment=4.0)))
    assert len(want) > 1
    verbose = client.audio.transcriptions.create(file=("long.wav", wav_bytes(recording)), model="any", response_format="verbose_json")
    got = [(s.start, s.end, s.text) for s in verbose.segments]
    assert got == [(round(s.start, 3), round(s.end, 3), s.text) for s in want]
    assert verbose.usage.type == "duration"


def test_undecodable_audio_is_a_400_naming_it_and_others_go_on(client, lm, tmp_path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio" * 4)
    good = wav_bytes(chirp(2.0, 3))
    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(lambda: client.chat.completions.create(model="m", messages=chat_message(good), max_tokens=12))
        with pytest.raises(openai.BadRequestError) as err:
            client.audio.transcriptions.create(file=bad.open("rb"), model="any")
        assert ok.result().choices[0].message.content == expected(lm, good, CAPTION_PROMPT, 12)
    body = err.value.body
    assert body["code"] == "invalid_audio" and "broken.wav" in body["message"] and body["param"] == "file", body
    assert err.value.response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="audio part 1"):
        client.chat.completions.create(model="m", messages=chat_message(b"\x00" * 5000), max_tokens=4)


def test_limits_give_413(client, server) -> None:
    too_big = wav_bytes(np.zeros(int(2.2 * 2**20 / 2), np.float32))  # 2.2 MB of 16-bit PCM over a 2 MB limit
    with pytest.raises(openai.APIStatusError) as err:
        client.audio.transcriptions.create(file=("big.wav", too_big), model="any")
    assert err.value.status_code == 413 and err.value.body["code"] == "upload_too_large"
    long_clip = wav_bytes(np.zeros(61 * 8000, np.float32), rate=8000)  # 61 s at 8 kHz: under 2 MB, over 60 s
    with pytest.raises(openai.APIStatusError) as err:
        client.audio.transcriptions.create(file=("long.wav", long_clip), model="any")
    assert err.value.status_code == 413 and err.value.body["code"] == "audio_too_long" and "61.0 s" in err.value.body["message"]


# -- chat completions ------------------------------------------------------------------------------
def test_chat_with_input_audio_plain_and_streamed(client, lm) -> None:
    audio = wav_bytes(chirp(3.0, 1))
    want = expected(lm, audio, CAPTION_PROMPT, 20)
    res = client.chat.completions.create(model="m", messages=chat_message(audio), max_tokens=20)
    assert res.choices[0].message.content == want and res.choices[0].finish_reason in ("stop", "length")
    assert res.usage.prompt_tokens_details.audio_tokens == C.n_audio_tokens(3 * C.SAMPLE_RATE)
    assert res.usage.completion_tokens <= 20 and res.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="m", messages=chat_message(audio), max_completion_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].usage.total_tokens == res.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == res.choices[0].finish_reason


def test_chat_options_questions_stop_and_data_urls(client, lm) -> None:
    audio = wav_bytes(chirp(2.0, 2))
    full = expected(lm, audio, "What do you hear?", 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    res = client.chat.completions.create(model="m", messages=chat_message(audio, "What do you hear?"), max_tokens=24, stop=[stop])
    assert res.choices[0].message.content == full[: full.index(stop)] and res.choices[0].finish_reason == "stop"
    url = "data:audio/wav;base64," + base64.b64encode(audio).decode()
    msgs = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}, {"type": "text", "text": "What do you hear?"}]}]
    res = client.chat.completions.create(model="m", messages=msgs, max_tokens=8)
    assert res.choices[0].message.content == lm.generate(audio, "", GenerationOptions(max_new_tokens=8), messages=[
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What do you hear?"}]}]).text


def test_questions_about_one_clip_share_its_encoding_and_prefix(client, lm) -> None:
    """Several questions about one clip at once, audio first: the later ones copy the clip's KV
    cells (usage.prompt_tokens_details.cached_tokens) and answer as they do alone."""
    audio = wav_bytes(chirp(4.0, 11))
    questions = ["What is heard?", "Is anyone speaking?", "Where is this?"]

    def messages(q: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(),
                                                                                     "format": "wav"}}, {"type": "text", "text": q}]}]

    alone = [lm.generate(audio, q, GenerationOptions(max_new_tokens=200, audio_first=True)).text for q in questions]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda q: client.chat.completions.create(model="m", messages=messages(q), max_tokens=200), questions))
    assert [g.choices[0].message.content for g in got] == alone
    n_audio = C.n_audio_tokens(4 * C.SAMPLE_RATE)
    assert max(g.usage.prompt_tokens_details.cached_tokens for g in got) >= n_audio, [g.usage for g in got]


def test_remote_audio_url_is_refused(client) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:1/a.wav"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=msgs)
    assert err.value.body["code"] == "invalid_url" and "does not fetch" in err.value.body["message"]


def test_context_overflow_is_a_400_before_any_work(client, server) -> None:
    before = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=chat_message(wav_bytes(chirp(1.0, 0))), max_tokens=10**6)
    assert err.value.body["code"] == "context_length_exceeded", err.value.body
    after = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert _metric(after, "mdl_edge_prompt_tokens_total") == _metric(before, "mdl_edge_prompt_tokens_total")


def test_concurrent_requests_equal_one_at_a_time(client, lm) -> None:
    clips = [wav_bytes(chirp(s, k)) for k, s in enumerate([1.0, 2.5, 4.0, 6.0, 1.5, 3.0])]
    want = [expected(lm, c, CAPTION_PROMPT, 24) for c in clips]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda c: client.chat.completions.create(model="m", messages=chat_message(c), max_tokens=24), clips))
    assert [g.choices[0].message.content for g in got] == want


# -- faults and security ---------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(server, client) -> None:
    audio = wav_bytes(chirp(2.0, 4))
    auth = {"Authorization": f"Bearer {KEY}"}
    cancelled = _metric(httpx.get(server.url + "/metrics", headers=auth).text, "mdl_edge_cancelled_total")
    limit = server.lm.decoder.max_positions - 200  # as long as the context allows: still running when the client leaves
    body = {"model": "m", "messages": chat_message(audio), "max_tokens": limit, "stream": True, "stream_options": {"include_usage": True}}
    n_chunks = 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                n_chunks += 1
            if n_chunks >= 3:
                break  # leave with the answer unfinished
    h = wait_idle(server)
    assert h["slots_busy"] == 0
    assert _metric(httpx.get(server.url + "/metrics", headers=auth).text, "mdl_edge_cancelled_total") == cancelled + 1
    res = client.chat.completions.create(model="m", messages=chat_message(audio), max_tokens=4)
    assert res.usage.completion_tokens >= 1


def test_disconnect_while_waiting_for_a_whole_answer(server) -> None:
    """A non-streamed request whose client gives up: the server notices, cancels it, frees the slot."""
    auth = {"Authorization": f"Bearer {KEY}"}
    cancelled = _metric(httpx.get(server.url + "/metrics", headers=auth).text, "mdl_edge_cancelled_total")
    body = {"model": "m", "messages": chat_message(wav_bytes(chirp(2.0, 9))), "max_tokens": server.lm.decoder.max_positions - 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth, timeout=httpx.Timeout(60, read=1.0))
    wait_idle(server)
    assert _metric(httpx.get(server.url + "/metrics", headers=auth).text, "mdl_edge_cancelled_total") == cancelled + 1


def test_api_key(server) -> None:
    for key in ("wrong", KEY + "x", ""):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            c.models.list()
        assert err.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no header at all
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [Path(server.lm.bundle.dir).name]


def test_full_queue_is_a_503_with_retry_after(bundle) -> None:
    """Two requests whose uploads stall hold both places (1 decoding + 1 waiting); the third gets
    503 with Retry-After; when the stalled clients go away, their places free."""
    import socket

    with Server(bundle, ServerOptions(port=0, parallel=1, max_queue=1), **LM) as s:
        stalled = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
            stalled.append(sock)
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["in_progress"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="m", messages=chat_message(wav_bytes(chirp(1.0, 5))), max_tokens=4)
        assert err.value.status_code == 503 and err.value.body["code"] == "server_overloaded"
        assert int(err.value.response.headers["retry-after"]) >= 1
        for sock in stalled:
            sock.close()
        wait_idle(s)
        assert c.chat.completions.create(model="m", messages=chat_message(wav_bytes(chirp(1.0, 5))), max_tokens=4).choices
        assert _metric(httpx.get(s.url + "/metrics").text, "mdl_edge_rejected_total") == 1.0


def test_metrics_page(server, client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="m", messages=chat_message(wav_bytes(chirp(1.0, 6))), max_tokens=6)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("mdl_edge_requests", "mdl_edge_queue_depth", "mdl_edge_time_to_first_token_seconds", "mdl_edge_tokens_per_second",
                 "mdl_edge_generated_tokens", "mdl_edge_slots_busy"):
        assert name in families, sorted(families)
    ttft = {s.name: s.value for s in families["mdl_edge_time_to_first_token_seconds"].samples}
    assert ttft["mdl_edge_time_to_first_token_seconds_count"] >= 1
    assert _metric(text, "mdl_edge_generated_tokens_total") >= 6


def test_uploads_leave_no_files_and_no_path_parameter(server, client, speech_wav, tmp_path) -> None:
    """Nothing a request sends is used as a path: a file name with ../ is only a name."""
    res = client.audio.transcriptions.create(file=("../../etc/passwd.wav", speech_wav.read_bytes()), model="/etc/passwd")
    assert isinstance(res.text, str)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("../" + Path(server.lm.bundle.dir).name)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on the metrics page")


def test_server_options_are_checked() -> None:
    from mdl_edge.runtime.errors import OptionError

    for bad in (dict(port=70000), dict(parallel=0), dict(max_upload_mb=0), dict(max_audio_s=float("nan")), dict(api_key=" ")):
        with pytest.raises(OptionError):
            ServerOptions(**bad)


def test_serve_command(bundle) -> None:
    """`mdl-edge serve` as users start it: it warns when bound beyond this machine without a key,
    answers, and stops cleanly on Ctrl-C (SIGINT)."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mdl_edge.runtime.cli", "serve", "--model", str(bundle), "--host", "0.0.0.0",
                             "--port", str(port), "--parallel", "2", "--threads", "2", "--decoder", "f32", "--encoder", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health").json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        assert health["slots"] == 2 and health["auth"] is False
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        assert c.chat.completions.create(model="m", messages=chat_message(wav_bytes(chirp(1.0, 8))), max_tokens=3).usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "without --api-key" in out and f"http://0.0.0.0:{port}" in out
