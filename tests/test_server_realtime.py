"""The Realtime transcription WebSocket (/v1/realtime), live on 127.0.0.1, spoken to by the
official ``openai`` client's realtime connection; and the page's microphone button in headless
Chromium with a fake capture device fed from a generated speech file."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="the server extra is not installed")
openai = pytest.importorskip("openai", reason="the dev extra is not installed")
pytest.importorskip("websockets", reason="openai[realtime] is not installed")

from mdl_edge.runtime import constants as C  # noqa: E402
from mdl_edge.runtime.g711 import encode  # noqa: E402
from mdl_edge.runtime.server import Server, ServerOptions  # noqa: E402

SR = C.SAMPLE_RATE
ARTIFACTS = Path(__file__).parent / "artifacts"
LM = dict(threads=2, encoder="int8", decoder="Q4_K_M")
KEY = "s3cret"


@pytest.fixture(scope="module")
def speech():
    from mdl_edge.export.toy import world

    if not world.espeak_available():
        pytest.skip("needs espeak-ng")
    clips = [c for c in world.eval_clips("connected", 6) if c.transcript][:3]
    quiet = (np.random.default_rng(0).standard_normal(SR) * 1e-4).astype(np.float32)
    return clips, np.concatenate([x for c in clips for x in (c.wave, quiet)])


@pytest.fixture(scope="module")
def served(toy_bundle):
    with Server(toy_bundle, ServerOptions(port=0, parallel=2, api_key=KEY, max_realtime=2), **LM) as s:
        yield s


def _pcm(wave: np.ndarray, rate: int) -> bytes:
    import soxr

    return (np.clip(soxr.resample(wave, SR, rate), -1, 1) * 32767).astype("<i2").tobytes()


def _connect(served, intent: str = "transcription", key: str = KEY):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=key)
    return client.realtime.connect(extra_query={"intent": intent})


def _feed(conn, data: bytes, rate: int, *, block: float = 0.1, sleep: float = 0.01) -> threading.Thread:
    step = int(rate * block) * 2

    def run() -> None:
        from websockets.exceptions import ConnectionClosed

        for i in range(0, len(data), step):
            try:
                conn.input_audio_buffer.append(audio=base64.b64encode(data[i : i + step]).decode())
            except ConnectionClosed:  # the test has read what it needed and closed
                return
            time.sleep(sleep)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(conn, kind: str, n: int, timeout: float = 60.0) -> list:
    """Events received until the ``n``-th of ``kind`` (all of them, in order)."""
    out, seen, deadline = [], 0, time.monotonic() + timeout
    for ev in conn:
        out.append(ev)
        seen += ev.type == kind
        if seen == n or time.monotonic() > deadline:
            return out
    return out


def test_openai_client_transcribes_as_the_live_engine_does(served, speech, toy_bundle) -> None:
    """Server VAD at OpenAI's 24 kHz PCM16: for each utterance speech_started, speech_stopped,
    committed, deltas and one completed transcript, equal to the live engine's finals on the same
    stream; deltas add up to the transcript."""
    from mdl_edge.runtime.live import LiveOptions, LiveSession
    from mdl_edge.runtime.pipeline import AudioLM

    clips, stream = speech
    with _connect(served) as conn:
        first = conn.recv()
        assert first.type == "session.created" and first.session.type == "transcription"
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "mdl-edge", "language": "en"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}}}})
        _feed(conn, _pcm(stream, 24000), 24000)
        events = _until(conn, "conversation.item.input_audio_transcription.completed", len(clips))
    kinds = [e.type for e in events]
    assert kinds[0] == "session.updated" and events[0].session.audio.input.format.rate == 24000
    done = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert len(done) == len(clips) and kinds.count("input_audio_buffer.committed") == len(clips)
    for d in done:
        item_kinds = [e.type for e in events if getattr(e, "item_id", None) == d.item_id]
        assert item_kinds[0] == "input_audio_buffer.speech_started" and item_kinds[-1].endswith(".completed"), item_kinds
        deltas = "".join(e.delta for e in events if e.type.endswith(".delta") and e.item_id == d.item_id)
        assert deltas == d.transcript, (deltas, d.transcript)
        assert d.usage.type == "tokens" and d.usage.input_token_details.audio_tokens > 0
    # the live engine on the same audio (as the server hears it: 24 kHz PCM16)
    pcm = np.frombuffer(_pcm(stream, 24000), "<i2")
    with AudioLM(toy_bundle, **LM) as lm:
        session = LiveSession(lm, LiveOptions(language="en", partial_every=0), sample_rate=24000)
        for i in range(0, pcm.size, 2400):
            session.push(pcm[i : i + 2400])
        session.finish()
        finals = [e.text for e in session.events() if e.type == "final"]
    assert [d.transcript for d in done] == finals
    print("heard:", finals, "said:", [c.transcript for c in clips])


def test_manual_commits_without_turn_detection_and_g711(served, speech) -> None:
    """turn_detection null: nothing is transcribed until the client commits; µ-law at 8 kHz. The
    whole clip arrives (its length and audio tokens), decoded as audioop decodes µ-law (below),
    and is heard: the toy model trains on telephone speech too (how well it hears it is
    test_toy.py's telephone test, over many clips; here at least one word said must come back)."""
    clips, _ = speech
    pcm8 = np.frombuffer(_pcm(clips[0].wave, 8000), "<i2")
    data = encode(pcm8, "audio/pcmu")
    with _connect(served) as conn:
        conn.recv()
        conn.session.update(session={"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}})
        assert conn.recv().type == "session.updated"
        _feed(conn, data, 8000, block=0.05, sleep=0.0).join()
        conn.input_audio_buffer.commit()
        events = _until(conn, "conversation.item.input_audio_transcription.completed", 1)
    done = events[-1]
    assert done.type.endswith(".completed") and isinstance(done.transcript, str), [e.type for e in events]
    assert "input_audio_buffer.committed" in [e.type for e in events]
    seconds = pcm8.size / 8000
    assert abs(done.audio_end_ms - done.audio_start_ms - 1000 * seconds) <= 10, (done.audio_start_ms, done.audio_end_ms, seconds)
    want_tokens = C.n_audio_tokens(round(seconds * SR))
    assert abs(done.usage.input_token_details.audio_tokens - want_tokens) <= 1, (done.usage, want_tokens)
    print("µ-law heard:", repr(done.transcript), "said:", clips[0].transcript)
    assert set(done.transcript.split()) & set(clips[0].transcript.split()), (done.transcript, clips[0].transcript)


def test_caption_sessions_send_caption_events(served, speech) -> None:
    """intent=caption: 10 s windows every 5 s; a commit closes the open window early."""
    clips, stream = speech
    long = np.concatenate([stream, stream])  # 17 s: windows end at 10 and 15 s, then the commit ends the third
    with _connect(served, "caption") as conn:
        conn.recv()
        _feed(conn, _pcm(long, 24000), 24000, sleep=0.0).join()
        conn.input_audio_buffer.commit()
        events = _until(conn, "mdl_edge.caption.completed", 3)
    caps = [e for e in events if e.type == "mdl_edge.caption.completed"]
    assert [(c.audio_start_ms, c.audio_end_ms) for c in caps[:2]] == [(0, 10000), (5000, 15000)]
    # the last ends where the audio did, less what the 24 -> 16 kHz resampler still holds (a few ms)
    assert caps[2].audio_start_ms == 10000 and abs(caps[2].audio_end_ms - long.size / SR * 1000) < 50
    assert all(c.caption for c in caps)
    print("captions:", [c.caption for c in caps])


def test_errors_keys_and_limits(served) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus):
        with _connect(served, key="wrong"):
            pass
    with _connect(served) as conn:
        conn.recv()
        conn.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
        err = conn.recv()
        assert err.type == "error" and err.error.code == "invalid_audio"
        conn.send({"type": "response.create"})
        assert conn.recv().error.code == "unknown_event"
        conn.session.update(session={"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 3}}}})
        err = conn.recv()
        assert err.error.code == "invalid_value" and err.error.param == "session.audio.input.format.rate"
        conn.input_audio_buffer.commit()
        assert conn.recv().error.code == "input_audio_buffer_commit_empty"
        # the server's limit is 2 connections: a third is refused
        with _connect(served) as second:
            second.recv()
            with _connect(served) as third:
                err = third.recv()
                assert err.type == "error" and err.error.code == "server_overloaded"
    # closed connections are counted out (and their streams cancelled)
    deadline = time.monotonic() + 10
    while served.app.state.mdl.realtime_open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.app.state.mdl.realtime_open == 0


def test_a_client_that_goes_away_mid_utterance_cancels_its_stream(served, speech) -> None:
    """Audio of an open utterance, then the socket closes: the stream is cancelled, its
    connection counted out, and the engine is left with nothing to do."""
    clips, _ = speech
    with _connect(served) as conn:
        conn.recv()
        conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        conn.recv()
        _feed(conn, _pcm(clips[0].wave, 24000), 24000, sleep=0.0).join()
    state = served.app.state.mdl
    deadline = time.monotonic() + 10
    while (state.realtime_open or state.engine.status().active or state.engine.status().queued) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.realtime_open == 0 and state.engine.status().active == 0 and state.engine.status().queued == 0


# -- the page ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mic_file(speech, tmp_path_factory) -> Path:
    clips, _ = speech
    quiet = (np.random.default_rng(1).standard_normal(int(1.5 * SR)) * 1e-4).astype(np.float32)
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    sf.write(path, np.concatenate([clips[0].wave, quiet, clips[1].wave, quiet]), SR, subtype="PCM_16")
    return path


def test_page_microphone_streams_to_the_realtime_endpoint(toy_bundle, mic_file, speech) -> None:
    """Press the page's microphone button in headless Chromium whose fake capture device plays a
    generated speech file: partials show, then one final line per utterance; screenshot kept."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra is not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mdl_edge.export.toy.world import word_accuracy

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver")
    clips, _ = speech
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800", "--disable-gpu",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={mic_file}",
                 "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        with Server(toy_bundle, ServerOptions(port=0, parallel=2, api_key=KEY), **LM) as srv:
            browser.get(srv.url)
            browser.find_element(By.ID, "key").send_keys(KEY)
            browser.find_element(By.ID, "mic").click()
            body = browser.find_element(By.TAG_NAME, "body")
            WebDriverWait(browser, 90).until(lambda b: int(body.get_attribute("data-finals") or 0) >= 2 or browser.find_element(By.ID, "error").text)
            assert browser.find_element(By.ID, "error").text == ""
            lines = [x.text for x in browser.find_elements(By.CSS_SELECTOR, "#finals li .text")]
            partials = int(body.get_attribute("data-partials") or 0)
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "server-page-live.png"))
            browser.find_element(By.ID, "mic").click()
            assert body.get_attribute("data-live") == "stopped"
    finally:
        browser.quit()
    heard = lines[:2]
    print("page heard:", heard, "said:", [c.transcript for c in clips[:2]], f"({partials} partials shown)")
    assert partials >= 1
    # Chromium's fake device on a loaded 2-core machine drops and distorts some audio (runs here
    # heard the first utterance as "dog", "dog eight", "dog big eight", the second as "bad black"
    # or "black black"): the page shows a final per utterance with words that were said. That the
    # endpoint hears exactly what the live engine hears is checked with the openai client above.
    scores = [word_accuracy(h, c.transcript) for h, c in zip(heard, clips)]
    assert len(heard) == 2 and all(heard) and min(scores) > 0.0, (heard, scores)
