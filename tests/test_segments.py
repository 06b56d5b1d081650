"""Long recordings: cuts at pauses of real (espeak-ng) speech, timed segments against the
reference, SRT/VTT parsed back by third-party parsers, damage part-way through a file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.cli import main
from mdl_edge.runtime.errors import OptionError
from mdl_edge.runtime.options import GenerationOptions as G
from mdl_edge.runtime.pipeline import AudioLM
from mdl_edge.runtime.prompt import transcribe_prompt
from mdl_edge.runtime.segments import SegmentOptions, TimedSegment, segment_stream
from mdl_edge.runtime.writers import SegmentWriter, output_paths, timestamp
from mdl_edge.runtime.options import DecoderOptions

SENTENCES = [
    "the meeting starts at nine in the morning", "please open the window", "yesterday it rained all day long",
    "we need three more chairs in the big room", "turn left after the bridge", "the red car is parked outside",
    "can you hear the music from the kitchen", "thank you very much for coming", "the train to the city leaves at noon",
    "my brother plays the guitar", "it is cold and windy today", "the report is due on friday",
]
PAUSES = [0.5, 1.2, 0.6, 2.0, 0.8, 0.5, 1.5, 0.7, 1.0, 0.55, 0.9]


def spoken_recording() -> tuple[dict[float, np.ndarray], list[tuple[float, float]], list[tuple[float, float]]]:
    """Sentences spoken by espeak-ng, joined by pauses of known length, mixed with white noise at
    three SNRs; the pauses and the sentences as (start, end) seconds. (Also the recording of
    tests/benchmarks/bench_vad.py.)"""
    from mdl_edge.export.toy import world as toyworld

    parts, pauses, sentences, pos = [], [], [], 0
    for k, text in enumerate(SENTENCES):
        x = toyworld.speak(text, "en-us+m3" if k % 2 else "en+f2", 160, 50)
        sentences.append((pos / C.SAMPLE_RATE, (pos + x.size) / C.SAMPLE_RATE))
        parts.append(x)
        pos += x.size
        if k < len(PAUSES):
            gap = int(PAUSES[k] * C.SAMPLE_RATE)
            parts.append(np.zeros(gap, np.float32))
            pauses.append((pos / C.SAMPLE_RATE, (pos + gap) / C.SAMPLE_RATE))
            pos += gap
    clean = np.concatenate(parts)
    level = float(np.sqrt(np.mean(clean[clean != 0] ** 2)))
    rng = np.random.default_rng(5)
    mixes = {snr: (clean + rng.standard_normal(clean.size).astype(np.float32) * level * 10 ** (-snr / 20)).astype(np.float32)
             for snr in (30.0, 15.0, 8.0)}
    return mixes, pauses, sentences


@pytest.fixture(scope="module")
def speech() -> tuple[dict[float, np.ndarray], list[tuple[float, float]]]:
    from mdl_edge.export.toy import world as toyworld

    if not toyworld.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    mixes, pauses, _ = spoken_recording()
    return mixes, pauses


def _blocks(x: np.ndarray, n: int = 8000):
    for i in range(0, x.size, n):
        yield x[i : i + n]


@pytest.mark.parametrize("snr", [30.0, 15.0, 8.0])
def test_vad_cuts_land_in_pauses(speech, snr: float) -> None:
    """Every cut lands inside a pause; with every pause kept (``max_pause=None``) segments tile
    the recording (every second of speech in exactly one segment); no segment exceeds the maximum."""
    mixes, pauses = speech
    x = mixes[snr]
    opts = SegmentOptions(mode="vad", max_segment=8.0, max_pause=None)
    segs = list(segment_stream(_blocks(x), opts, "vad"))
    starts = [s for s, _ in segs]
    assert starts[0] == 0 and sum(w.size for _, w in segs) == x.size
    assert all(a + w.size == b for (a, w), b in zip(segs, starts[1:])), "segments must tile the recording"
    assert all(w.size <= 8.0 * C.SAMPLE_RATE for _, w in segs)
    cuts = [s / C.SAMPLE_RATE for s in starts[1:]]
    assert len(cuts) >= 4
    outside = [c for c in cuts if not any(a - 0.005 <= c <= b + 0.005 for a, b in pauses)]
    assert not outside, f"SNR {snr} dB: cuts at {outside} s fall outside every pause {pauses}"


@pytest.mark.parametrize("snr", [30.0, 8.0])
def test_long_pauses_are_left_out(snr: float) -> None:
    """Sentences apart by silences of 3-12 s (over noise): every sentence lies whole in one
    segment, no segment holds more quiet than ``max_pause`` plus its margins, and the silences
    are not answered; a recording without speech gives one short segment, its end."""
    from mdl_edge.export.toy import world as toyworld

    if not toyworld.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    sr, rng = C.SAMPLE_RATE, np.random.default_rng(3)
    parts, spans, pos = [], [], 0
    for k, (text, gap) in enumerate(zip(SENTENCES[:5], (3.0, 12.0, 4.5, 0.7, 8.0))):
        voiced = toyworld.speak(text, "en-us+m3" if k % 2 else "en+f2", 160, 50)
        spans.append((pos, pos + voiced.size))
        parts += [voiced, np.zeros(int(gap * sr), np.float32)]
        pos += voiced.size + int(gap * sr)
    clean = np.concatenate(parts)
    level = float(np.sqrt(np.mean(clean[clean != 0] ** 2)))
    x = (clean + rng.standard_normal(clean.size).astype(np.float32) * level * 10 ** (-snr / 20)).astype(np.float32)
    opts = SegmentOptions(mode="vad", max_segment=30.0)
    segs = [(s, s + w.size) for s, w in segment_stream(_blocks(x), opts, "vad")]
    for a, b in spans:
        holding = [(s, e) for s, e in segs if s <= a + 0.03 * sr and b - 0.03 * sr <= e]
        assert len(holding) == 1, f"SNR {snr} dB: speech {a / sr:.2f}-{b / sr:.2f} s is not whole in one segment of {segs}"
    quiet_kept = max(min(e, b2) - max(s, b1) for s, e in segs for (_, b1), (b2, _) in zip(spans, spans[1:]))
    assert quiet_kept <= (opts.max_pause + 2 * opts.pause_margin) * sr + 0.1 * sr, quiet_kept / sr
    for n in (7001, x.size):  # the cuts do not depend on how the recording streams in
        assert [(s, s + w.size) for s, w in segment_stream(_blocks(x, n), opts, "vad")] == segs, n
    assert max(e - s for s, e in segs) <= opts.max_segment * sr
    answered = sum(e - s for s, e in segs) / x.size
    assert answered < 0.6, f"{answered:.2f} of the recording answered"
    # every pause kept: the same recording tiled
    tiled = [(s, s + w.size) for s, w in segment_stream(_blocks(x), SegmentOptions(mode="vad", max_pause=None), "vad")]
    assert tiled[0][0] == 0 and tiled[-1][1] == x.size and all(e == s2 for (_, e), (s2, _) in zip(tiled, tiled[1:]))
    quiet = np.zeros(70 * sr, np.float32)
    assert [(s, w.size) for s, w in segment_stream(_blocks(quiet), opts, "vad")] == [(quiet.size - int(opts.pause_margin * sr), int(opts.pause_margin * sr))]


def test_vad_sees_the_pauses(speech) -> None:
    """The goal's measure: a pause of at least 0.5 s is found (a silence run of >= 0.3 s inside it)
    in >= 95% of cases, over the three SNRs."""
    from mdl_edge.runtime.segments import VAD_FRAME, VoiceActivity

    mixes, pauses = speech
    found = []
    for x in mixes.values():
        frames = VoiceActivity(2).frames(x)
        t = (np.arange(frames.size) + 0.5) * VAD_FRAME / C.SAMPLE_RATE
        for a, b in pauses:
            inside = ~frames[(t > a) & (t < b)]
            run = best = 0
            for v in inside:
                run = run + 1 if v else 0
                best = max(best, run)
            found.append(best * VAD_FRAME / C.SAMPLE_RATE >= 0.3)
    rate = float(np.mean(found))
    print(f"pauses found: {rate:.3f} of {len(found)}")
    assert rate >= 0.95, f"only {rate:.2f} of the pauses >= 0.5 s were found"


def test_windows_and_short_clips() -> None:
    x = np.zeros(int(25.5 * C.SAMPLE_RATE), np.float32)
    segs = list(segment_stream(_blocks(x, 7000), SegmentOptions(mode="window", window=10.0), "window"))
    assert [w.size for _, w in segs] == [160000, 160000, 88000]
    short = np.ones(int(4 * C.SAMPLE_RATE), np.float32) * 0.1
    assert [w.size for _, w in segment_stream(_blocks(short), SegmentOptions(), "vad")] == [short.size]
    with pytest.raises(OptionError, match="max_segment"):
        SegmentOptions(max_segment=0.5)
    with pytest.raises(OptionError, match="segment"):
        SegmentOptions(mode="sentences")


def _tone_with_gaps(seconds: float, gaps: list[float]) -> np.ndarray:
    """A 440 Hz tone with 0.4 s of silence starting at each of ``gaps`` (seconds)."""
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for g in gaps:
        x[int(g * C.SAMPLE_RATE) : int((g + 0.4) * C.SAMPLE_RATE)] = 0.0
    return x


def test_auto_answers_up_to_max_segment_whole_for_both_tasks() -> None:
    """Under auto a 13 s (or 30 s) recording is one segment whether captioned or transcribed;
    only a longer one is cut."""
    auto = SegmentOptions()
    for seconds in (13.0, 30.0):
        x = _tone_with_gaps(seconds, [6.0])
        for task in ("caption", "transcribe"):
            mode = auto.resolved(task)
            segs = list(segment_stream(_blocks(x), auto, mode))
            assert [(s, w.size) for s, w in segs] == [(0, x.size)], f"{task}, {seconds} s: {[(s, w.size) for s, w in segs]}"
            assert not auto.cuts(mode, x.size)
    assert auto.cuts("window", int(30.5 * C.SAMPLE_RATE)) and not auto.cuts("window", None)
    assert SegmentOptions(mode="window").cuts("window", 16000) and not SegmentOptions(mode="none").cuts("none", 10**9)


def test_caption_windows_end_at_quiet_moments() -> None:
    """Past the whole-clip limit captions go in windows of at most 10 s, each ended at the
    quietest moment of its last 40% (the gaps at 8.2 s and 17.0 s), not at a hard cut."""
    x = _tone_with_gaps(40.0, [8.2, 17.0, 25.5, 33.9])
    segs = list(segment_stream(_blocks(x), SegmentOptions(), "window"))
    starts = [s / C.SAMPLE_RATE for s, _ in segs]
    assert all(w.size <= 10 * C.SAMPLE_RATE for _, w in segs) and sum(w.size for _, w in segs) == x.size
    for cut, gap in zip(starts[1:], (8.2, 17.0, 25.5, 33.9)):
        assert gap <= cut <= gap + 0.4, f"a cut at {cut:.2f} s, the quiet moment is {gap}-{gap + 0.4} s ({starts})"


def test_cli_captions_a_13_s_clip_whole(bundle, tmp_path, capsys) -> None:
    """A 13 s file under the default --segment auto gets one caption, not two 10 s windows."""
    path = tmp_path / "thirteen.wav"
    sf.write(path, _tone_with_gaps(13.0, [6.0]), C.SAMPLE_RATE)
    assert main(["caption", str(path), "--model", str(bundle), "--max-new-tokens", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1 and "index" not in lines[0] and lines[0]["file"] == str(path), lines


def test_segments_equal_the_reference_on_their_samples(bundle, tiny_qwen2_model, speech) -> None:
    """Each segment's greedy tokens are the reference's on that segment's own samples, two
    segments decoded at a time; times are the segment's place in the recording."""
    x = speech[0][15.0][: int(30 * C.SAMPLE_RATE)]
    opts = SegmentOptions(mode="vad", max_segment=8.0)
    want = [(s, w) for s, w in segment_stream(_blocks(x), opts, "vad")]
    with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True)) as lm:
        got = list(lm.transcribe_segments(x, G(max_new_tokens=8), segmenting=opts, sample_rate=C.SAMPLE_RATE, parallel=2))
    assert [g.index for g in got] == list(range(len(want)))
    for g, (s, w) in zip(got, want):
        assert g.start == pytest.approx(s / C.SAMPLE_RATE) and g.end == pytest.approx((s + w.size) / C.SAMPLE_RATE)
        ref = tiny_qwen2_model.generate(w, transcribe_prompt(None), max_new_tokens=8)
        assert list(g.token_ids) == list(ref.token_ids), f"segment {g.index} ({g.start:.2f}-{g.end:.2f} s)"


def test_srt_and_vtt_parse_back() -> None:
    import srt
    import webvtt

    segs = [TimedSegment(0, 0.0, 8.25, "hello there"), TimedSegment(1, 8.25, 15.0, "two\n\nlines --> with arrow"),
            TimedSegment(2, 15.0, 3725.5, "")]
    for fmt in ("srt", "vtt"):
        buf = io.StringIO()
        w = SegmentWriter(buf, fmt, source="x.wav")
        for s in segs:
            w.write(s)
        w.close()
        if fmt == "srt":
            subs = list(srt.parse(buf.getvalue()))
            times = [(c.start.total_seconds(), c.end.total_seconds()) for c in subs]
            assert subs[0].content == "hello there"
        else:
            cues = webvtt.from_buffer(io.StringIO(buf.getvalue()))
            def secs(t: str) -> float:  # webvtt-py's *_in_seconds are whole seconds
                h, m, rest = t.split(":")
                return int(h) * 3600 + int(m) * 60 + float(rest)

            times = [(secs(c.start), secs(c.end)) for c in cues]
            assert cues[0].text == "hello there"
        assert [round(a, 3) for a, _ in times] == [0.0, 8.25, 15.0] and round(times[-1][1], 1) == 3725.5
        assert all(a < b for a, b in times) and all(b1 <= a2 for (_, b1), (a2, _) in zip(times, times[1:]))
    assert timestamp(3725.5) == "01:02:05,500" and timestamp(0.0004, ".") == "00:00:00.000"


def test_cli_long_file_formats_and_damage(bundle, speech, tmp_path, capsys) -> None:
    x = speech[0][30.0]
    path = tmp_path / "talk.flac"
    sf.write(path, x, C.SAMPLE_RATE)
    out = tmp_path / "out"
    out.mkdir()
    base = ["transcribe", "--model", str(bundle), "--max-new-tokens", "4", "--max-segment", "8"]
    assert main([*base, str(path), "--format", "srt", "-o", str(out)]) == 0
    import srt

    subs = list(srt.parse((out / "talk.srt").read_text()))
    assert len(subs) >= 4 and subs[-1].end.total_seconds() == pytest.approx(x.size / C.SAMPLE_RATE, abs=0.002)
    assert main([*base, str(path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [ln["index"] for ln in lines] == list(range(len(subs))) and all(ln["file"] == str(path) for ln in lines)
    # damage part-way: the segments before it are written, the error names the file and the time
    data = path.read_bytes()
    broken = tmp_path / "broken.flac"
    broken.write_bytes(data[: len(data) * 6 // 10])
    assert main([*base, str(broken), "--format", "jsonl"]) == 1
    cap = capsys.readouterr()
    done = [json.loads(line) for line in cap.out.splitlines()]
    assert "broken.flac: decoding failed" in cap.err and " s into the recording" in cap.err
    assert "decoding failed" in done.pop()["error"] and done
    assert done[-1]["end"] <= x.size / C.SAMPLE_RATE * 0.6 + 0.5
    # a short clip without --format behaves as before: one line "path: text"
    short = tmp_path / "short.wav"
    sf.write(short, x[: 3 * C.SAMPLE_RATE], C.SAMPLE_RATE)
    assert main(["caption", str(short), "--model", str(bundle), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"{short}: ")
    assert main([*base, str(short), str(path), "-o", str(tmp_path / "one.txt")]) == 2
    capsys.readouterr()
    assert main([*base, str(short), str(path), "--format", "srt"]) == 2  # two SRT documents on stdout would be one broken file
    assert "give -o FOLDER for several inputs" in capsys.readouterr().err


def test_output_paths_mirror_the_inputs_and_never_collide(tmp_path) -> None:
    out = tmp_path / "out"
    # one folder: names alone, as before
    assert output_paths(["in/a.wav", "in/b.flac"], out, "srt") == [out / "a.srt", out / "b.srt"]
    # a tree: the tree under the folder the inputs share; a shared stem keeps its ending
    got = output_paths(["in/a.wav", "in/sub/a.wav", "in/sub/a.flac", "in/sub/b.mp3", "in/a.wav"], out, "txt")
    assert got == [out / "a.txt", out / "sub/a.wav.txt", out / "sub/a.flac.txt", out / "sub/b.txt", out / "a.txt"], got
    assert output_paths(["/x/y/talk.m4a"], out, "vtt") == [out / "talk.vtt"]


def test_cli_folder_input_answers_every_audio_file_under_it(bundle, tmp_path, capsys) -> None:
    """A folder stands for the audio files under it (hidden files, such as macOS's ``._x.wav``
    resource forks, and files of other kinds passed over); with ``-o`` the outputs mirror its tree,
    a stem shared by two files keeping their endings apart."""
    from mdl_edge.runtime.cluster import expand_inputs
    from mdl_edge.runtime.errors import ConfigError

    from conftest import chirp

    tree = tmp_path / "in"
    (tree / "sub").mkdir(parents=True)
    (tree / ".cache").mkdir()
    wave = chirp(1.0, 2)
    for rel in ("a.wav", "sub/a.wav", "sub/a.flac", ".cache/x.wav"):
        sf.write(tree / rel, wave, C.SAMPLE_RATE)
    (tree / "sub/._a.wav").write_bytes(b"\x00\x05\x16\x07 not audio")
    (tree / "notes.md").write_text("not audio")
    (tree / "sub/up").symlink_to("..")  # a loop: walked once
    (tree / "twin").symlink_to("sub")  # a second way to a folder: its files once
    want = [tree / "a.wav", tree / "sub/a.flac", tree / "sub/a.wav"]
    assert expand_inputs([str(tree)]) == [str(p) for p in want]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: no audio files in this folder or under it"):
        expand_inputs([str(tmp_path / "empty")])

    base = ["--model", str(bundle), "--max-new-tokens", "3"]
    assert main(["caption", str(tree), *base]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in printed] == [str(p) for p in want], printed
    out = tmp_path / "out"
    out.mkdir()
    assert main(["transcribe", str(tree), *base, "--format", "srt", "-o", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.srt", "sub/a.flac.srt", "sub/a.wav.srt"], written  # no NAME.partial left
    # a rerun with --skip-existing answers only what has no output (a NAME.partial is not one)
    (out / "sub/a.wav.srt").rename(out / "sub/a.wav.srt.partial")
    before = {p: p.stat().st_mtime_ns for p in (out / "a.srt", out / "sub/a.flac.srt")}
    capsys.readouterr()
    assert main(["transcribe", str(tree), *base, "--format", "srt", "-o", str(out), "--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert err.count("(there already)") == 2 and "2 of 3 input(s) skipped" in err and f"{tree / 'sub/a.wav'} -> " in err, err
    assert {p: p.stat().st_mtime_ns for p in before} == before and (out / "sub/a.wav.srt").is_file()
    assert not (out / "sub/a.wav.srt.partial").exists()
    assert main(["transcribe", str(tree), *base, "--skip-existing"]) == 2  # without -o there is nothing to skip by


def test_cli_segments_of_many_files_keep_the_input_order(bundle, speech, tmp_path, capsys) -> None:
    """Short files around a long one, as timed segments on stdout: the short ones are decoded
    together (whole, as ``caption --json`` answers them), every file's lines in input order."""
    x = speech[0][30.0]
    paths = []
    for name, n in (("a.wav", 2), ("b.wav", 3), ("long.flac", 0), ("c.wav", 2)):
        p = tmp_path / name
        sf.write(p, x[: n * C.SAMPLE_RATE] if n else x, C.SAMPLE_RATE)
        paths.append(str(p))
    base = ["--model", str(bundle), "--max-new-tokens", "4", "--no-progress", "--parallel", "2"]
    capsys.readouterr()
    assert main(["transcribe", *paths, *base, "--format", "jsonl", "--max-segment", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    order = [ln["file"] for ln in lines]
    assert [p for i, p in enumerate(order) if i == 0 or order[i - 1] != p] == paths, order
    assert order.count(paths[2]) >= 3 and all(order.count(p) == 1 for p in paths[:2] + paths[3:])
    assert main(["transcribe", *[paths[i] for i in (0, 1, 3)], *base, "--json"]) == 0
    whole = {r["file"]: r["token_ids"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert all(ln["token_ids"] == whole[ln["file"]] for ln in lines if ln["file"] in whole)


def test_cli_ctrl_c_leaves_a_partial_output_that_skip_existing_answers_again(bundle, tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from conftest import chirp

    path = tmp_path / "long.flac"
    sf.write(path, chirp(240.0, 5), C.SAMPLE_RATE)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "mdl_edge.runtime.cli", "caption", str(path), "--model", str(bundle), "--segment", "window",
           "--window", "2", "--format", "srt", "-o", str(out), "--max-new-tokens", "48", "--parallel", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = out / "long.srt.partial"
    deadline = time.monotonic() + 120
    while not (partial.is_file() and partial.stat().st_size > 0) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log
    assert partial.is_file() and not (out / "long.srt").exists(), log  # cut short: not taken for a finished output
    assert "cut short" in log, log
    rc = subprocess.run([*cmd, "--skip-existing"], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0 and (out / "long.srt").is_file() and not partial.exists(), rc.stderr
