"""The console script: the README's main job, synth, reference caption, and error reporting."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import soundfile as sf

from mdl_edge.runtime.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    assert main(["demo", "--preset", "tiny", "--workdir", str(tmp_path), "--seconds", "3", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "synthesized checkpoint" in out and "random weights" in out
    assert "3.00 s audio -> 15 audio tokens; 4 new tokens" in out
    for stage in ("decode audio", "mel", "encoder", "projector", "prefill", "decode"):
        assert f"{stage} " in out


def test_reference_caption(tiny_dir, tmp_path, capsys) -> None:
    good = tmp_path / "a.wav"
    sf.write(good, (np.random.default_rng(0).standard_normal(44100) * 0.1).astype(np.float32), 44100)
    bad = tmp_path / "b.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    code = main(["reference", "caption", str(good), str(bad), "--model", str(tiny_dir), "--max-new-tokens", "3"])
    cap = capsys.readouterr()
    assert code == 1  # one file failed, the other was still captioned
    assert f"{good}: " in cap.out and "5 audio tokens" in cap.out
    assert f"{bad}: cannot decode audio" in cap.err


def test_synth_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["synth", "--preset", "huge", "--out", str(tmp_path / "m")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["synth", "--preset", "tiny", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert main(["synth", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    assert main(["reference", "caption", str(wav), "--model", str(tmp_path / "nope")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "mdl_edge.runtime.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "synth" in out and "reference" in out and "demo" in out


def test_runtime_does_not_import_torch() -> None:
    code = "import sys, mdl_edge.runtime.cli, mdl_edge.runtime.prompt, mdl_edge.runtime.audio, mdl_edge.runtime.mel; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


def test_default_demo_hears_a_held_out_clip(toy_dir, tmp_path, capsys) -> None:
    """The README's main job: the toy model (shipped, or trained and cached by the fixture)
    captions and transcribes a clip it never trained on, and transcribes a sentence of connected
    speech, with the runtime's smallest variants."""
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"toy model (trained on generated speech and sounds; official layout): {toy_dir}" in out
    assert "held-out clip" in out and "caption: '" in out and "transcript: '" in out
    assert out.count("matches the generator's") + out.count("differs from the generator's") == 2
    # a sentence of connected speech with words outside the vocabulary, and what the model wrote
    assert "5. connected speech" in out and "demo-connected.wav" in out
    assert out.count("matches the vocabulary words said") + out.count("differs from the vocabulary words said") == 1
    for stage in ("decode audio", "mel", "encoder", "projector", "prefill", "decode", "time to first token"):
        assert f"{stage} " in out


def test_train_toy_scores_both_evaluation_sets(toy_dir, capsys) -> None:
    """`train-toy --evaluate N` on the toy model there is (shipped or cached: nothing is trained
    again) scores the reference on N held-out clips and N phrases of connected speech."""
    import re

    assert main(["train-toy", "--evaluate", "4"]) == 0
    out = capsys.readouterr().out
    assert str(toy_dir) in out
    held = re.search(r"held-out \(4 clips, \d with speech\): word accuracy ([\d.]+), caption exact ([\d.]+)", out)
    conn = re.search(r"connected speech \(4 phrases, \d with words outside the vocabulary\): word accuracy ([\d.]+), phrase exact ([\d.]+)", out)
    assert held and conn, out
    assert all(0.0 <= float(v) <= 1.0 for v in (*held.groups(), *conn.groups()))


def test_standard_input_as_an_audio_file(bundle, tmp_path, capsys, monkeypatch) -> None:
    """``-`` decodes what comes on standard input (``ffmpeg ... -f wav - | mdl-edge transcribe -``),
    answered as the same file would be, long ones segment by segment; it names itself ``-`` in
    messages, cannot be a resumable job's input and must not be a terminal."""
    import io
    import json

    from conftest import chirp

    from mdl_edge.runtime import constants as C

    path = tmp_path / "talk.flac"
    sf.write(path, chirp(9.0, 4), C.SAMPLE_RATE)
    opts = ["--model", str(bundle), "--max-new-tokens", "4", "--no-progress"]
    cmd = [sys.executable, "-m", "mdl_edge.runtime.cli"]
    for extra in (["--json"], ["--segment", "window", "--window", "4", "--format", "jsonl"]):
        want = subprocess.run([*cmd, "caption", str(path), *opts, *extra], capture_output=True, text=True, check=True).stdout
        got = subprocess.run([*cmd, "caption", "-", *opts, *extra], input=path.read_bytes(), capture_output=True, check=True).stdout
        w, g = [json.loads(x) for x in want.splitlines()], [json.loads(x) for x in got.decode().splitlines()]
        assert len(g) == len(w) >= 1 and all(a["file"] == "-" for a in g), got
        assert [(a["text"], a["token_ids"]) for a in g] == [(a["text"], a["token_ids"]) for a in w]
    folder = tmp_path / "out"
    folder.mkdir()
    subprocess.run([*cmd, "caption", "-", *opts, "--format", "srt", "-o", str(folder)], input=path.read_bytes(), check=True)
    assert [p.name for p in folder.iterdir()] == ["stdin.srt"]
    bad = subprocess.run([*cmd, "caption", "-", *opts], input=b"RIFF\x24\x00\x00\x00WAVEfmt not audio", capture_output=True, text=False)
    assert bad.returncode == 1 and b"mdl-edge: error: -: " in bad.stderr, bad.stderr

    class Terminal(io.BytesIO):
        buffer = io.BytesIO()

        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    assert main(["caption", "-", *opts]) == 2
    assert "standard input, but it is a terminal" in capsys.readouterr().err
    assert main(["caption", "-", *opts, "--out", str(tmp_path / "rows.jsonl")]) == 2
    assert "cannot be a job's input" in capsys.readouterr().err
