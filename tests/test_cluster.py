"""Batch answering on Ray Data: a local Ray instance (2 CPUs), 2 actors, a dozen tiny clips.

Each row must equal the single-process CLI's answer for its file (same greedy tokens); a corrupt
file gets an error row naming it; a rerun answers nothing new; an actor that dies mid-job is
replaced and its files answered; Ctrl-C leaves a valid partial output that a rerun completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
pytest.importorskip("ray.data")

import soundfile as sf  # noqa: E402

from mdl_edge.runtime import constants as C  # noqa: E402
from mdl_edge.runtime.cli import main  # noqa: E402
from mdl_edge.runtime.cluster import ClusterOptions, answer_files, answered_files, expand_inputs, rows_in  # noqa: E402
from mdl_edge.runtime.options import GenerationOptions  # noqa: E402
from mdl_edge.runtime.prompt import CAPTION_PROMPT  # noqa: E402
from mdl_edge.runtime.options import DecoderOptions, EncoderOptions

COMMON = ["--encoder", "fp32", "--decoder", "f32", "--max-new-tokens", "10", "--parallel", "2", "--no-progress"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("clips")
    paths = []
    for k in range(12):
        n = int((0.8 + 0.4 * k) * C.SAMPLE_RATE)
        t = np.arange(n) / C.SAMPLE_RATE
        x = 0.3 * np.sin(2 * np.pi * (180 + 35 * k) * t * (1 + 0.3 * t)) + np.random.default_rng(k).standard_normal(n) * 0.03
        p = d / f"clip{k:02d}.wav"
        sf.write(p, x.astype(np.float32), C.SAMPLE_RATE)
        paths.append(str(p))
    (d / "clip05.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt not audio at all")
    return d, paths


def cli_rows(bundle, paths, capsys) -> dict[str, dict]:
    capsys.readouterr()
    main(["caption", *paths, "--model", str(bundle), "--json", *COMMON])
    return {r["file"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def test_inputs_are_files_globs_and_lists(clips, tmp_path) -> None:
    d, paths = clips
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the first two, one relative to the list\n{paths[0]}\n{os.path.relpath(paths[1], tmp_path)}\n")
    got = expand_inputs([str(listing), str(d / "clip1*.wav"), paths[0]])
    assert [os.path.realpath(p) for p in got] == [os.path.realpath(p) for p in (paths[0], paths[1], paths[10], paths[11], paths[0])]
    with pytest.raises(Exception, match="no file matches"):
        expand_inputs([str(d / "nothing*.wav")])


def test_two_actors_equal_the_single_process_cli(local_ray, bundle, clips, tmp_path, capsys, monkeypatch) -> None:
    from ray.data import DataContext

    d, paths = clips
    want = cli_rows(bundle, paths, capsys)
    # Ray Data hands batches to whichever actor is up first: with a dozen tiny clips one actor can
    # answer them all before the other has loaded. Here the pool waits for both, so both answer.
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 300)
    out = tmp_path / "rows.jsonl"
    rc = main(["caption", str(d / "clip*.wav"), "--model", str(bundle), "--engine", "ray", "--workers", "2", "--cpus-per-worker", "1",
               "--batch-size", "3", "--out", str(out), *COMMON])
    assert rc == 1  # one corrupt input
    rows = list(rows_in(out))
    assert sorted(r["file"] for r in rows) == sorted(paths)
    assert len({r["worker"] for r in rows}) == 2  # both actors answered
    for r in rows:
        if r["file"].endswith("clip05.wav"):
            assert "clip05.wav" in r["error"] and "error" in want[r["file"]]
        else:
            assert (r["text"], r["token_ids"]) == (want[r["file"]]["text"], want[r["file"]]["token_ids"]), r["file"]
    # the same job again answers nothing new and starts no actor
    capsys.readouterr()
    assert main(["caption", str(d / "clip*.wav"), "--model", str(bundle), "--engine", "ray", "--out", str(out), *COMMON]) == 0
    assert "12 already in" in capsys.readouterr().err and len(list(rows_in(out))) == 12
    assert answered_files(out, retry_errors=True) == set(paths) - {str(d / "clip05.wav")}


def test_a_killed_actor_is_replaced_and_its_files_answered(local_ray, bundle, clips, tmp_path, capsys) -> None:
    d, paths = clips
    good = [p for p in paths if not p.endswith("clip05.wav")]
    want = cli_rows(bundle, good, capsys)
    marker = tmp_path / "crashed"
    out = tmp_path / "rows.parquet"
    summary = answer_files(good, bundle, out=out, prompt=CAPTION_PROMPT, options=GenerationOptions(max_new_tokens=10),
                           cluster=ClusterOptions(workers=2, cpus_per_worker=1, batch_size=2, parallel=2),
                           encoder=EncoderOptions(variant="fp32"), decoder=DecoderOptions(variant="f32"), crash_once=("clip07.wav", str(marker)))
    assert marker.is_file()  # an actor died (os._exit) holding clip07's batch
    assert (summary.answered, summary.failed) == (len(good), 0)
    rows = {r["file"]: r for r in rows_in(out)}  # Parquet, written when the job completed
    assert sorted(rows) == sorted(good)
    assert all(list(rows[p]["token_ids"]) == want[p]["token_ids"] for p in good)


def _busy_cores(n: int) -> list[subprocess.Popen]:
    """Processes that keep ``n`` cores busy (the load another job puts on a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_ctrl_c_leaves_a_valid_partial_output(local_ray, bundle, clips, tmp_path) -> None:
    """Ctrl-C ends the job promptly even on a loaded machine (another Ray instance in this
    process, every core kept busy): the rows so far are whole and a rerun answers the rest."""
    d, paths = clips
    many = tmp_path / "many"
    many.mkdir()
    for k in range(40):
        (many / f"c{k:02d}.wav").write_bytes(Path(paths[k % 12 if k % 12 != 5 else 4]).read_bytes())
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "mdl_edge.runtime.cli", "caption", str(many / "*.wav"), "--model", str(bundle), "--engine", "ray",
           "--workers", "1", "--batch-size", "1", "--out", str(out), "--encoder", "fp32", "--decoder", "f32", "--max-new-tokens", "48",
           "--parallel", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_file() and out.read_text().count("\n") >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    load = _busy_cores(os.cpu_count() or 2)
    try:
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
        waited = time.monotonic() - t
    finally:
        for q in load:
            q.kill()
    assert waited < 20, f"the job took {waited:.1f} s to stop after Ctrl-C\n{log}"
    assert "run the same command again" in log, log
    partial = out.read_text().splitlines()
    assert all(json.loads(line)["file"] for line in partial), log  # every line whole
    assert proc.returncode in (0, 130), log
    done = len(partial)
    rc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in many.glob("*.wav"))  # each once: nothing answered twice
    assert f"{done} already in" in rc.stderr, (done, rc.stderr[-500:])


def test_long_recordings_are_segmented_as_on_one_machine(local_ray, bundle, tmp_path) -> None:
    """A recording longer than --max-segment is cut at its pauses inside the actor: its rows are
    the segments AudioLM.transcribe_segments gives in-process."""
    from mdl_edge.export.toy import world as toyworld
    from mdl_edge.runtime.pipeline import AudioLM
    from mdl_edge.runtime.segments import SegmentOptions

    if not toyworld.espeak_available():
        pytest.skip("espeak-ng is not installed")
    parts = [toyworld.speak(t, "en+f2", 160, 50) for t in ("turn left after the bridge", "the red car is parked outside",
                                                           "my brother plays the guitar")]
    pause = np.zeros(int(0.8 * C.SAMPLE_RATE), np.float32)
    path = tmp_path / "talk.wav"
    sf.write(path, np.concatenate([parts[0], pause, parts[1], pause, parts[2]]), C.SAMPLE_RATE)
    options, segmenting = GenerationOptions(max_new_tokens=10), SegmentOptions(max_segment=3.0)
    with AudioLM(bundle, encoder="fp32", decoder="f32") as lm:
        want = list(lm.transcribe_segments(path, options, segmenting=segmenting))
    assert len(want) > 1
    out = tmp_path / "rows.jsonl"
    answer_files([str(path)], bundle, out=out, prompt="Transcribe the speech into text", task="transcribe", options=options,
                 segmenting=segmenting, cluster=ClusterOptions(workers=1, cpus_per_worker=2, parallel=2),
                 encoder=EncoderOptions(variant="fp32"), decoder=DecoderOptions(variant="f32"))
    rows = sorted(rows_in(out), key=lambda r: r["segment"])
    assert [(r["start"], r["end"], r["text"]) for r in rows] == [(round(s.start, 3), round(s.end, 3), s.text) for s in want]
    assert all(r["n_segments"] == len(want) for r in rows) and answered_files(out) == {str(path)}
