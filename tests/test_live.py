"""Live captions and transcription (runtime/live.py): the engine's cuts, partials and finals, its
chunk reuse against the offline encoder, back-pressure and dropping, and ``mdl-edge live``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf

from pathlib import Path

from conftest import assert_close
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.errors import AudioError, MdlEdgeError, OptionError
from mdl_edge.runtime.live import LiveEvent, LiveOptions, LiveSession
from mdl_edge.runtime.live_audio import OpenSegment, paced
from mdl_edge.runtime.options import GenerationOptions
from mdl_edge.runtime.pipeline import AudioLM

SR = C.SAMPLE_RATE
QUIET = 1e-4  # a quiet room, as the toy world's clips have it
GEN = GenerationOptions(max_new_tokens=4)


def _quiet(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * QUIET).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_lm(bundle):
    with AudioLM(bundle, threads=2) as lm:
        yield lm


@pytest.fixture(scope="module")
def toy_lm(toy_bundle):
    with AudioLM(toy_bundle, threads=2, encoder="int8", decoder="Q4_K_M") as lm:
        yield lm


@pytest.fixture(scope="module")
def utterances():
    """Connected-speech clips (each with its own quiet lead-in and tail) and a stream of them,
    a second of quiet after each."""
    from mdl_edge.export.toy import world

    if not world.espeak_available():
        pytest.skip("needs espeak-ng")
    clips = [c for c in world.eval_clips("connected", 8) if c.transcript][:5]
    stream = np.concatenate([x for i, c in enumerate(clips) for x in (c.wave, _quiet(1.0, i))])
    return clips, stream


def _run(lm, stream: np.ndarray, options: LiveOptions, *, block: float = 0.1, rate: int = SR, speed: float | None = None,
         convert=lambda x: x) -> tuple[list[LiveEvent], LiveSession]:
    session = LiveSession(lm, options, sample_rate=rate)
    blocks = [stream[i : i + int(block * rate)] for i in range(0, stream.shape[0], int(block * rate))]
    for b in paced(blocks, rate, block_seconds=block, speed=speed) if speed else blocks:
        session.push(convert(b))
    session.finish()
    return list(session.events()), session


# -- the encoder's reuse of finished chunks ---------------------------------------------------------
def test_partials_reuse_finished_chunks_and_equal_the_offline_encoder(tiny_lm) -> None:
    """A 25 s utterance encoded as it grows (partials at 3, 11, 21 s) and at its end: each
    result equals the offline encoder's embeddings of the same samples, and chunks that were
    finished at one partial are not encoded again at the next."""
    from mdl_edge.runtime.encoder import chunk_plan

    rng = np.random.default_rng(1)
    wave = (rng.standard_normal(25 * SR) * 0.1).astype(np.float32)
    seg = OpenSegment(0, 0, tiny_lm.encoder.acoustic_mels, 2)
    calls: list[set[int]] = []
    real = tiny_lm.encoder.chunk_features

    def spy(mel, n, *, skip=()):
        out = real(mel, n, skip=skip)
        calls.append(set(out))
        return out

    tiny_lm.encoder.chunk_features = spy
    try:
        done = 0
        for upto, final in ((3 * SR, False), (11 * SR, False), (21 * SR, False), (wave.size, True)):
            seg.add(wave[done:upto])
            done = upto
            got = seg.embeddings(tiny_lm, final=final)
            want = tiny_lm.encoder.embed(wave[:upto])
            assert got.shape == want.shape
            assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"live embeddings at {upto / SR:.0f} s")
    finally:
        del tiny_lm.encoder.chunk_features
    plans = [len(chunk_plan(n)) for n in (3 * SR, 11 * SR, 21 * SR, wave.size)]
    assert plans == [1, 2, 3, 3]
    # 11 s: chunk 0 was partial at 3 s, so both run; 21 s: chunk 0 is reused; the end: 0 and 1 are reused
    assert calls == [{0}, {0, 1}, {1, 2}, {2}], calls


def test_a_louder_sound_later_re_encodes_the_finished_chunks(tiny_lm) -> None:
    """top_db is relative to the clip's peak: a chunk encoded before a louder sound came is not
    reused (the result still equals the offline encoder)."""
    rng = np.random.default_rng(2)
    wave = (rng.standard_normal(14 * SR) * 1e-3).astype(np.float32)
    wave[: 10 * SR] = 0.0  # digital silence: its frames sit at the 1e-10 floor, far below any top_db limit
    wave[12 * SR :] *= 300  # then a loud sound
    seg = OpenSegment(0, 0, tiny_lm.encoder.acoustic_mels, 2)
    seg.add(wave[: 11 * SR])
    seg.embeddings(tiny_lm, final=False)
    seg.add(wave[11 * SR :])
    calls: list[set[int]] = []
    real = tiny_lm.encoder.chunk_features
    tiny_lm.encoder.chunk_features = lambda mel, n, *, skip=(): calls.append(set(out := real(mel, n, skip=skip))) or out
    try:
        got = seg.embeddings(tiny_lm, final=True)
    finally:
        del tiny_lm.encoder.chunk_features
    assert calls == [{0, 1}]  # chunk 0 was finished, but its silence is now clamped
    assert_close(got, tiny_lm.encoder.embed(wave), atol=1e-5, rtol=1e-5, what="after a louder sound")


# -- transcription on the trained toy model ---------------------------------------------------------
def test_each_utterance_gets_one_final_as_heard_offline(toy_lm, utterances) -> None:
    """Five utterances streamed (at 4x real-time pace, partials on): one final each, in order,
    timed within its clip, with partials before it; each final is exactly the offline
    transcription of the same samples (the live path's reused chunks and all), and hears the
    clips about as well as offline transcription of the whole clips does (measured on 30 clips at
    real-time pace and 100 pushed unpaced by tests/benchmarks/bench_live.py)."""
    from mdl_edge.export.toy.world import word_accuracy
    from mdl_edge.runtime.segments import VAD_FRAME

    clips, stream = utterances
    options = LiveOptions(partial_every=0.3)
    events, session = _run(toy_lm, stream, options, speed=4.0)
    finals = [e for e in events if e.type == "final"]
    assert len(finals) == len(clips), [(e.type, e.start, e.end, e.text) for e in events]
    assert [e.item for e in finals] == list(range(len(clips)))
    offsets = np.cumsum([0] + [c.wave.size / SR + 1.0 for c in clips])
    for f, c, t0 in zip(finals, clips, offsets):
        first_word, last_word = c.words[0][1] + t0, c.words[-1][2] + t0
        assert f.start <= first_word + 0.1 and f.end >= last_word - 0.2 and f.end <= t0 + c.wave.size / SR + 0.05, (f, first_word, last_word)
    # an utterance's audio: from its start to the frame where the pause reached `silence`
    pause = round(options.silence * SR / VAD_FRAME) * VAD_FRAME
    same = [toy_lm.transcribe(stream[round(f.start * SR) : round(f.end * SR) + pause], sample_rate=SR).text.strip() for f in finals]
    assert [f.text for f in finals] == same
    whole = [toy_lm.transcribe(c.wave, sample_rate=SR).text.strip() for c in clips]
    live_acc = np.mean([word_accuracy(f.text, c.transcript) for f, c in zip(finals, clips)])
    whole_acc = np.mean([word_accuracy(o, c.transcript) for o, c in zip(whole, clips)])
    print(f"live {[f.text for f in finals]} ({live_acc:.2f}); whole clips offline {whole} ({whole_acc:.2f})")
    assert live_acc >= 0.5
    # events of an item come in order: started, partials, stopped, the final's pieces, the final
    for k, f in enumerate(finals):
        kinds = [e.type for e in events if e.item == k]
        stopped = kinds.index("speech_stopped")
        assert kinds[0] == "speech_started" and set(kinds[1:stopped]) <= {"partial"} and kinds[-1] == "final", kinds
        assert set(kinds[stopped + 1 : -1]) == {"final_delta"}, kinds
        assert "".join(e.text for e in events if e.item == k and e.type == "final_delta").strip() == f.text
    assert session.stats.partials >= 1 and session.stats.finals == len(clips) and session.stats.dropped_blocks == 0


def test_steady_noise_does_not_hold_an_utterance_open(tiny_lm, utterances) -> None:
    """Quiet, then speech in white noise (10 dB below the speech) that goes on 2 s after the last
    word: WebRTC's VAD alone calls the sudden noise speech until it stops; with the noise gate the
    utterance ends at the speech."""
    clips, _ = utterances
    c = clips[0]
    body = np.concatenate([c.wave, np.zeros(2 * SR, np.float32)])
    sig = float(np.sqrt(np.mean(c.wave**2)))
    noisy = body + (np.random.default_rng(5).standard_normal(body.size) * sig * 10 ** (-10 / 20)).astype(np.float32)
    stream = np.concatenate([_quiet(2.0), noisy, _quiet(1.0, 1)])
    ends = {}
    for gate in (0.0, 6.0):
        events, _ = _run(tiny_lm, stream, LiveOptions(noise_gate_db=gate, partial_every=0, generation=GEN))
        ends[gate] = [e.end for e in events if e.type == "speech_stopped"]
    last_word, noise_end = 2.0 + c.words[-1][2], 2.0 + body.size / SR
    assert ends[0.0][-1] > noise_end - 0.3, ends  # the noise held it open to its end
    assert len(ends[6.0]) == 1 and abs(ends[6.0][0] - last_word) < 0.3, (ends, last_word)


def _word_edits(a: list[str], b: list[str]) -> int:
    """Words inserted, deleted or replaced between two lists of transcripts, one pair at a time."""
    import difflib

    assert len(a) == len(b), (a, b)
    return sum(max(i2 - i1, j2 - j1) for x, y in zip(a, b)
               for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=x.split(), b=y.split(), autojunk=False).get_opcodes() if tag != "equal")


# A stream sent up to 44.1 or 48 kHz and back reaches the model without what lay above the
# resamplers' passband (~7.3 kHz at 16 kHz), so a model on the edge of a word may hear one word
# otherwise; a wrong rate, channel or sample conversion changes many, and the utterances' times.
MAX_RESAMPLED_EDITS = 1


def test_any_rate_and_integer_stereo_hear_the_same(toy_lm, utterances) -> None:
    """44.1 kHz int16 stereo blocks give the same utterances, at the same times, and the same
    words (but for at most one) as 16 kHz float mono."""
    import soxr

    clips, stream = utterances
    base, _ = _run(toy_lm, stream, LiveOptions(partial_every=0))
    hi = soxr.resample(stream, SR, 44100)
    stereo = (np.clip(np.stack([hi, hi], axis=1), -1, 1) * 32767).astype(np.int16)
    other, _ = _run(toy_lm, stereo, LiveOptions(partial_every=0), rate=44100)
    a = [(e.text, e.start) for e in base if e.type == "final"]
    b = [(e.text, e.start) for e in other if e.type == "final"]
    assert len(a) == len(b) == len(clips), (a, b)
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 0.1, (a, b)
    assert _word_edits([t for t, _ in a], [t for t, _ in b]) <= MAX_RESAMPLED_EDITS, (a, b)


def test_without_vad_an_utterance_ends_at_commit_and_clear_forgets(tiny_lm) -> None:
    session = LiveSession(tiny_lm, LiveOptions(vad=False, partial_every=0, generation=GEN))
    session.push(_quiet(1.0))
    session.commit()
    session.push(_quiet(0.5, 1))
    session.clear()
    session.push(_quiet(2.0, 2))
    session.finish()
    finals = [e for e in session.events() if e.type == "final"]
    assert [(e.item, round(e.start, 2), round(e.end, 2)) for e in finals] == [(0, 0.0, 1.0), (2, 1.5, 3.5)]


def test_long_speech_is_cut_at_the_longest_utterance(tiny_lm) -> None:
    session = LiveSession(tiny_lm, LiveOptions(vad=False, max_utterance=2.0, partial_every=0, generation=GEN))
    for _ in range(5):
        session.push(_quiet(1.0))
    session.finish()
    finals = [(round(e.start, 2), round(e.end, 2)) for e in session.events() if e.type == "final"]
    assert finals == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]


# -- captions ---------------------------------------------------------------------------------------
def test_caption_windows_with_hop_cover_the_stream_once_each(tiny_lm) -> None:
    """25 s in 10 s windows every 5 s: windows end at 10, 15, 20 and 25 s; at the end nothing is
    left unheard, so no extra window; 27 s leaves 2 s, heard by the open window from 20 s."""
    for seconds, want in ((25, [(0, 10), (5, 15), (10, 20), (15, 25)]), (27, [(0, 10), (5, 15), (10, 20), (15, 25), (20, 27)])):
        session = LiveSession(tiny_lm, LiveOptions(task="caption", partial_every=0, generation=GEN))
        for k in range(seconds * 10):
            session.push(_quiet(0.1, k))
        session.finish()
        finals = [(round(e.start), round(e.end)) for e in session.events() if e.type == "final"]
        assert finals == want, (seconds, finals)


# -- flow: back-pressure, dropping, errors ----------------------------------------------------------
def _stalled(lm, options: LiveOptions) -> tuple[LiveSession, threading.Event]:
    """A session whose worker is held inside its first event's callback (a machine that cannot keep up)."""
    release = threading.Event()
    session = LiveSession(lm, options, on_event=lambda e: release.wait(30) if e.type == "speech_started" else None)
    session.push(_quiet(0.1))  # vad=False: the first audio opens an utterance, whose event stalls the worker
    return session, release


def test_a_machine_that_cannot_keep_up_drops_and_counts(tiny_lm) -> None:
    session, release = _stalled(tiny_lm, LiveOptions(vad=False, drop=True, max_buffered=0.5, partial_every=0, generation=GEN))
    kept = [session.push(_quiet(0.2, k)) for k in range(10)]
    release.set()
    session.finish()
    stats = session.stats
    assert kept.count(False) == stats.dropped_blocks >= 5
    assert stats.dropped_seconds == pytest.approx(0.2 * stats.dropped_blocks)
    assert stats.audio_seconds == pytest.approx(2.1)


def test_back_pressure_waits_and_then_says_why(tiny_lm) -> None:
    session, release = _stalled(tiny_lm, LiveOptions(vad=False, max_buffered=0.5, partial_every=0, generation=GEN))
    for k in range(2):
        session.push(_quiet(0.2, k))
    with pytest.raises(MdlEdgeError, match="no room for more audio"):
        for k in range(3):
            session.push(_quiet(0.2, k), timeout=0.3)
    assert session.stats.queued_seconds <= 0.5
    release.set()
    session.finish()


def test_bad_audio_and_options_are_named(tiny_lm) -> None:
    session = LiveSession(tiny_lm, LiveOptions(generation=GEN), name="radio")
    with pytest.raises(AudioError, match="radio: 1 samples are NaN"):
        session.push(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AudioError, match="radio: expected"):
        session.push(np.zeros((2, 2, 2), np.float32))
    session.finish()
    with pytest.raises(MdlEdgeError, match="finished"):
        session.push(_quiet(0.1))
    for kw, name in (({"task": "summarise"}, "task"), ({"silence": 0.0}, "silence"), ({"hop": 20.0}, "hop"),
                     ({"partial_budget": 2}, "partial_budget"), ({"aggressiveness": 5}, "aggressiveness"), ({"noise_gate_db": -1}, "noise_gate_db")):
        with pytest.raises(OptionError) as e:
            LiveOptions(**kw)
        assert e.value.option == name


def test_cancel_stops_at_once(tiny_lm) -> None:
    session = LiveSession(tiny_lm, LiveOptions(vad=False, generation=GenerationOptions(max_new_tokens=200)))
    session.push(_quiet(3.0))
    session.commit()
    session.cancel()
    assert session.ended


# -- mdl-edge live ----------------------------------------------------------------------------------
def _cli(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 300,
         sigint: object = signal.SIG_DFL) -> subprocess.CompletedProcess:
    """``mdl-edge live ARGS``, started with SIGINT's disposition ``sigint`` (SIG_DFL as from a
    terminal; SIG_IGN as a background job inherits it); a run that hangs fails with every
    thread's Python stack (faulthandler on SIGABRT), not a bare timeout."""
    cmd = [sys.executable, "-X", "faulthandler", "-m", "mdl_edge.runtime.cli", "live", *args]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, **(env or {})}, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint)) as proc:
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"mdl-edge live {' '.join(args)} hung for {timeout} s; its threads:\n{err.decode(errors='replace')[-8000:]}\n"
                        f"its output:\n{out.decode(errors='replace')[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_cli_live_from_a_file_and_from_stdin_pcm(toy_bundle, utterances, tmp_path) -> None:
    import srt

    clips, stream = utterances
    path = tmp_path / "talk.wav"
    sf.write(path, stream, SR, subtype="PCM_16")
    r = _cli(str(path), "--model", str(toy_bundle), "--format", "srt", "--encoder", "int8", "--decoder", "Q4_K_M")
    assert r.returncode == 0, r.stderr.decode()
    subs = list(srt.parse(r.stdout.decode()))
    assert len(subs) == len(clips)
    r = _cli(str(path), "--realtime", "--model", str(toy_bundle), "--format", "jsonl", "--encoder", "int8", "--decoder", "Q4_K_M",
             "--partial-every", "0.3")
    events = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert r.returncode == 0 and {"speech_started", "partial", "speech_stopped", "final"} <= {e["type"] for e in events}
    assert [e["text"] for e in events if e["type"] == "final"] == [s.content for s in subs]
    # the same audio as ffmpeg would pipe it: 48 kHz stereo s16le on stdin
    import soxr

    hi = soxr.resample(stream, SR, 48000)
    pcm = (np.clip(np.stack([hi, hi], axis=1), -1, 1) * 32767).astype("<i2").tobytes()
    r = _cli("-", "--rate", "48000", "--channels", "2", "--model", str(toy_bundle), "--encoder", "int8", "--decoder", "Q4_K_M",
             stdin=pcm)
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 0 and len(lines) == len(subs), lines
    assert _word_edits([line.split("] ", 1)[1] for line in lines], [s.content for s in subs]) <= MAX_RESAMPLED_EDITS, lines


def test_cli_live_says_what_is_wrong(bundle, tmp_path) -> None:
    r = _cli("--model", str(bundle))
    assert r.returncode == 2 and b"give an audio file, - for PCM on stdin, or --mic" in r.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF junk")
    r = _cli(str(bad), "--model", str(bundle))
    assert r.returncode == 1 and str(bad).encode() in r.stderr
    r = _cli(str(bad), "--model", str(bundle), "--silence", "0")
    assert r.returncode == 2 and b"--silence" in r.stderr


def test_cli_live_from_the_microphone_until_ctrl_c(toy_bundle, utterances, tmp_path) -> None:
    """``--mic`` through a stand-in for sounddevice (no capture device here) that plays a speech
    file at real-time pace through the stream callback, then sends SIGINT: what was heard is
    finalised and written, and the exit is clean."""
    clips, stream = utterances
    wav = tmp_path / "mic.wav"
    sf.write(wav, stream[: int(sum(c.wave.size + SR for c in clips[:2]))], SR, subtype="PCM_16")
    env = {"PYTHONPATH": str(Path(__file__).parent / "data" / "fake_sounddevice"), "FAKE_MIC_WAV": str(wav)}
    r = _cli("--list-devices", env=env)
    assert r.returncode == 0 and r.stdout.decode().strip() == "0: fake microphone (1 ch, 16000 Hz)"
    # started as a terminal starts it, and as a background job (SIGINT inherited ignored): Ctrl-C
    # ends both (the second listened for ever before)
    for sigint in (signal.SIG_DFL, signal.SIG_IGN):
        r = _cli("--mic", "--device", "0", "--model", str(toy_bundle), "--format", "jsonl", "--encoder", "int8", "--decoder", "Q4_K_M", env=env,
                 timeout=120, sigint=sigint)
        assert r.returncode == 0, r.stderr.decode()
        finals = [json.loads(line) for line in r.stdout.decode().splitlines() if '"final"' in line]
        assert len(finals) == 2, r.stdout.decode()
        assert b"listening" in r.stderr
    r = _cli("--mic", "--device", "7", "--model", str(toy_bundle), env=env)
    assert r.returncode == 1 and b"microphone 7" in r.stderr


def test_terminal_output_replaces_partials_in_place_and_commits_finals() -> None:
    import io

    from mdl_edge.runtime.live_cli import EventPrinter

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = EventPrinter(out, "text", "mic")
    for ev in (LiveEvent("speech_started", 0, 1.0, 1.0), LiveEvent("partial", 0, 1.0, 1.5, "red"),
               LiveEvent("partial", 0, 1.0, 2.0, "red cat"), LiveEvent("speech_stopped", 0, 1.0, 2.2),
               LiveEvent("final", 0, 1.0, 2.2, "red cat")):
        p(ev)
    assert out.getvalue() == ("\r\033[K[00:00:01.000] red …\r\033[K[00:00:01.000] red cat …"
                              "\r\033[K[00:00:01.000 --> 00:00:02.200] red cat\n")
