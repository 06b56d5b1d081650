"""A job of many files in this process (``--out`` without ``--engine ray``, ``ClusterOptions(engine="local")``): the rows Ray's job
writes, each equal to the CLI's answer for its file; a rerun with the same ``--out`` answers only
what is missing, and Ctrl-C leaves a valid partial output that a rerun completes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.cli import main
from mdl_edge.runtime.cluster import ClusterOptions, answer_files, answered_files, rows_in
from mdl_edge.runtime.options import DecoderOptions, EncoderOptions, GenerationOptions
from mdl_edge.runtime.prompt import CAPTION_PROMPT

COMMON = ["--encoder", "fp32", "--decoder", "f32", "--max-new-tokens", "10", "--parallel", "2", "--no-progress"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, list[str]]:
    """Six short clips in a folder and its subfolder, one of them corrupt."""
    d = tmp_path_factory.mktemp("clips")
    (d / "sub").mkdir()
    paths = []
    for k in range(6):
        n = int((0.8 + 0.5 * k) * C.SAMPLE_RATE)
        t = np.arange(n) / C.SAMPLE_RATE
        x = 0.3 * np.sin(2 * np.pi * (200 + 40 * k) * t * (1 + 0.3 * t)) + np.random.default_rng(k).standard_normal(n) * 0.03
        p = d / ("sub" if k % 2 else "") / f"clip{k}.wav"
        sf.write(p, x.astype(np.float32), C.SAMPLE_RATE)
        paths.append(str(p))
    Path(paths[3]).write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt not audio at all")  # sub/clip3.wav
    return d, sorted(paths)


def cli_answers(bundle: Path, paths: list[str], capsys) -> dict[str, dict]:
    capsys.readouterr()
    main(["caption", *paths, "--model", str(bundle), "--json", *COMMON])
    return {r["file"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def test_rows_equal_the_cli_and_a_rerun_goes_on_where_the_first_stopped(bundle, clips, tmp_path, capsys) -> None:
    d, paths = clips
    want = cli_answers(bundle, paths, capsys)
    out = tmp_path / "rows.jsonl"
    first = tmp_path / "first.txt"
    first.write_text("\n".join(paths[:2]) + "\n")
    assert main(["caption", str(first), "--model", str(bundle), "--out", str(out), *COMMON]) == 0
    assert sorted(r["file"] for r in rows_in(out)) == paths[:2]
    capsys.readouterr()
    assert main(["caption", str(d), "--model", str(bundle), "--out", str(out), *COMMON]) == 1  # one corrupt input
    err = capsys.readouterr().err
    assert "6 input(s): 2 already in" in err and "3 answered, 1 failed" in err, err
    rows = list(rows_in(out))
    assert sorted(r["file"] for r in rows) == paths  # each once
    for r in rows:
        if r["file"].endswith("clip3.wav"):
            assert "clip3.wav" in r["error"] and "error" in want[r["file"]]
        else:
            assert (r["text"], r["token_ids"]) == (want[r["file"]]["text"], want[r["file"]]["token_ids"]), r["file"]
            assert r["n_segments"] == 1 and r["end"] == pytest.approx(sf.info(r["file"]).duration, abs=1e-3)
    # the error row counts as answered unless asked to retry it
    capsys.readouterr()
    assert main(["caption", str(d), "--model", str(bundle), "--out", str(out), *COMMON]) == 0
    assert "6 already in" in capsys.readouterr().err
    assert main(["caption", str(d), "--model", str(bundle), "--out", str(out), "--retry-errors", *COMMON]) == 1
    assert "5 already in" in capsys.readouterr().err
    assert answered_files(out, retry_errors=True) == {p for p in paths if not p.endswith("clip3.wav")}


def test_parquet_output_and_the_python_api(bundle, clips, tmp_path, capsys) -> None:
    pytest.importorskip("pyarrow", reason="Parquet needs the cluster extra")
    _, paths = clips
    good = [p for p in paths if not p.endswith("clip3.wav")]
    want = cli_answers(bundle, good, capsys)
    out = tmp_path / "rows.parquet"
    summary = answer_files(good, bundle, out=out, prompt=CAPTION_PROMPT, options=GenerationOptions(max_new_tokens=10),
                           cluster=ClusterOptions(engine="local", parallel=2), encoder=EncoderOptions(variant="fp32"), decoder=DecoderOptions(variant="f32"))
    assert (summary.inputs, summary.skipped, summary.answered, summary.failed) == (len(good), 0, len(good), 0)
    rows = {r["file"]: r for r in rows_in(out)}
    assert sorted(rows) == good and all(list(rows[p]["token_ids"]) == want[p]["token_ids"] for p in good)


def test_out_and_per_file_outputs_exclude_each_other(bundle, clips, tmp_path, capsys) -> None:
    _, paths = clips
    rc = main(["transcribe", paths[0], "--model", str(bundle), "--out", str(tmp_path / "r.jsonl"), "--format", "srt"])
    assert rc == 2 and "give one or the other" in capsys.readouterr().err


def test_ctrl_c_leaves_a_valid_partial_output(bundle, clips, tmp_path) -> None:
    _, paths = clips
    many = tmp_path / "many"
    many.mkdir()
    for k in range(60):
        good = [p for p in paths if not p.endswith("clip3.wav")]
        (many / f"c{k:02d}.wav").write_bytes(Path(good[k % len(good)]).read_bytes())
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "mdl_edge.runtime.cli", "caption", str(many), "--model", str(bundle), "--out", str(out),
           "--encoder", "fp32", "--decoder", "f32", "--max-new-tokens", "48", "--parallel", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_file() and out.read_text().count("\n") >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t < 20, log
    # 130: stopped by the signal; 0 or -SIGINT: it came as the job ended (every row written)
    assert proc.returncode in (0, 130, -signal.SIGINT), log
    if proc.returncode == 130:
        assert "run the same command again" in log, log
    partial = out.read_text().splitlines()
    assert all(json.loads(line)["file"] for line in partial), log  # every line whole
    rc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in many.glob("*.wav"))  # each once: nothing answered twice
    assert f"{len(partial)} already in" in rc.stderr, (len(partial), rc.stderr[-500:])


def test_a_long_recording_is_answered_segment_by_segment_as_the_cli_does(bundle, tmp_path, capsys) -> None:
    from conftest import chirp

    path = tmp_path / "long.flac"
    sf.write(path, chirp(10.0, 3), C.SAMPLE_RATE)
    opts = ["--model", str(bundle), "--segment", "window", "--window", "4", *COMMON]
    capsys.readouterr()
    assert main(["caption", str(path), *opts, "--format", "jsonl"]) == 0
    want = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    out = tmp_path / "rows.jsonl"
    assert main(["caption", str(path), *opts, "--out", str(out)]) == 0
    rows = list(rows_in(out))
    assert len(rows) == len(want) >= 3 and all(r["n_segments"] == len(want) for r in rows)
    assert [(r["segment"], r["start"], r["end"], r["token_ids"]) for r in rows] == \
        [(w["index"], w["start"], w["end"], w["token_ids"]) for w in want]
