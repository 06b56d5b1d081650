"""Audio loading into mono float32 16 kHz: formats, rates, sample types, blocks and bad files."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

import mdl_edge.runtime.audio as audio_mod
from mdl_edge.runtime.audio import iter_audio, load_audio
from mdl_edge.runtime.errors import AudioError
from mdl_edge.runtime.mel import log_mel, log_mel_blocks

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not on PATH (tests/run.sh installs it)")


def _sine(freq: float, sr: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _peak_hz(x: np.ndarray) -> float:
    x = x[: 16000]
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * 16000 / x.size)


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_resampled_to_16k_keeps_frequency(tmp_path, sr: int) -> None:
    path = tmp_path / "s.wav"
    sf.write(path, _sine(1000, sr), sr)
    x = load_audio(path)
    assert x.dtype == np.float32 and abs(x.size - 16000) <= 1
    assert abs(_peak_hz(x) - 1000) < 2
    assert 0.45 < np.abs(x[2000:-2000]).max() < 0.55


@pytest.mark.parametrize("subtype,tol", [("PCM_U8", 2e-2), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-6), ("FLOAT", 1e-7), ("DOUBLE", 1e-7)])
def test_pcm_and_float_wav_scaled_and_stereo_to_mono(tmp_path, subtype: str, tol: float) -> None:
    left, right = _sine(440, 16000), _sine(880, 16000, amp=0.25)
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype=subtype)
    x = load_audio(path)
    assert np.abs(x - (left + right) / 2).max() < tol


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_integer_stereo_arrays_are_scaled_before_channels_are_averaged(dtype) -> None:
    left, right = _sine(440, 16000), _sine(880, 16000, amp=0.25)
    scale = np.iinfo(dtype).max + 1
    pcm = np.round(np.stack([left, right], axis=1) * (scale - 1)).astype(dtype)
    x = load_audio(pcm, sample_rate=16000)
    worst = float(np.abs(x - (left + right) / 2).max())
    assert worst < 1e-4, f"worst difference {worst}"


@pytest.mark.parametrize(
    "fmt,subtype,ext,sr,tol",
    [("FLAC", "PCM_16", "flac", 16000, 1e-4), ("OGG", "VORBIS", "ogg", 44100, None), ("OGG", "OPUS", "opus", 48000, None), ("MP3", "MPEG_LAYER_III", "mp3", 44100, None)],
)
def test_soundfile_formats_round_trip(tmp_path, fmt, subtype, ext, sr, tol) -> None:
    src = _sine(1000, sr, seconds=2.0)
    path = tmp_path / f"a.{ext}"
    sf.write(path, src, sr, format=fmt, subtype=subtype)
    x = load_audio(path)
    assert abs(x.size - 32000) < 2000  # codecs add priming / padding
    assert abs(_peak_hz(x[4000:]) - 1000) < 2
    if tol is not None:
        assert np.abs(x - _sine(1000, 16000, seconds=2.0)).max() < tol


@needs_ffmpeg
@pytest.mark.parametrize("ext,args", [("m4a", ["-c:a", "aac"]), ("aac", ["-c:a", "aac"]), ("webm", ["-c:a", "libopus"]), ("mkv", ["-c:a", "aac"])])
def test_ffmpeg_containers(tmp_path, ext, args) -> None:
    wav = tmp_path / "src.wav"
    sf.write(wav, np.stack([_sine(1000, 44100, 2.0)] * 2, axis=1), 44100)
    out = tmp_path / f"a.{ext}"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), *args, str(out)], check=True)
    for source in (out, out.read_bytes(), io.BytesIO(out.read_bytes())):
        x = load_audio(source)
        assert abs(x.size - 32000) < 2000 and abs(_peak_hz(x[4000:]) - 1000) < 2


@needs_ffmpeg
def test_ffmpeg_video_file_audio_track(tmp_path) -> None:
    out = tmp_path / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=64x64:d=2", "-f", "lavfi",
         "-i", "sine=frequency=1000:duration=2:sample_rate=48000", "-shortest", "-c:v", "mpeg4", "-c:a", "aac", str(out)],
        check=True,
    )
    x = load_audio(out)
    assert abs(x.size - 32000) < 3000 and abs(_peak_hz(x[4000:]) - 1000) < 2


def test_bytes_file_object_and_arrays() -> None:
    buf = io.BytesIO()
    sf.write(buf, _sine(500, 16000), 16000, format="WAV")
    a = load_audio(buf.getvalue())
    buf.seek(0)
    b = load_audio(buf)
    c = load_audio((_sine(500, 16000) * 32767).astype(np.int16), sample_rate=16000)
    d = load_audio(np.stack([_sine(500, 32000)] * 2, axis=1), sample_rate=32000)
    assert np.abs(a - b).max() == 0 and np.abs(a - c).max() < 1e-4
    assert abs(d.size - 16000) <= 1 and abs(_peak_hz(d) - 500) < 2


def test_array_rate_is_checked_not_assumed(tmp_path) -> None:
    with pytest.raises(AudioError, match="pass sample_rate"):
        load_audio(np.zeros(100, np.float32))
    path = tmp_path / "a.wav"
    sf.write(path, _sine(440, 22050), 22050)
    with pytest.raises(AudioError, match="22050 Hz but sample_rate=16000"):
        load_audio(path, sample_rate=16000)
    with pytest.raises(AudioError, match="channels, samples"):
        load_audio(np.zeros((2, 16000), np.float32), sample_rate=16000)


def test_long_file_decodes_in_blocks_and_mel_matches(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(audio_mod, "BLOCK_FRAMES", 10_000)
    path = tmp_path / "long.flac"
    rng = np.random.default_rng(0)
    sf.write(path, (rng.standard_normal(44100 * 20) * 0.1).astype(np.float32), 44100, subtype="PCM_16")
    blocks = list(iter_audio(path))
    assert len(blocks) > 50 and max(b.size for b in blocks) < 10_000
    whole = load_audio(path)
    assert np.array_equal(np.concatenate(blocks), whole)
    assert np.array_equal(log_mel_blocks(iter_audio(path)), log_mel(whole))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p.write_bytes(b""), "empty \\(0 bytes\\)"),
        (lambda p: p.write_bytes(b"this is not audio" * 100), "cannot decode audio"),
        (lambda p: sf.write(p, np.zeros(0, np.float32), 16000, format="WAV"), "empty \\(0 samples\\)"),
        (lambda p: sf.write(p, np.full(1000, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT"), "1000 decoded samples are NaN"),
    ],
    ids=["zero-bytes", "garbage", "no-samples", "all-nan"],
)
def test_bad_files_name_the_file(tmp_path, make, match) -> None:
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError, match=match) as e:
        load_audio(path)
    assert str(path) in str(e.value)


def test_truncated_wav_and_mp3(tmp_path) -> None:
    for fmt, subtype, ext, what in [("WAV", "PCM_16", "wav", "truncated WAV"), ("MP3", "MPEG_LAYER_III", "mp3", "truncated MP3")]:
        good = tmp_path / f"good.{ext}"
        sf.write(good, _sine(440, 44100, 3.0), 44100, format=fmt, subtype=subtype)
        bad = tmp_path / f"bad.{ext}"
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(AudioError, match=what):
            load_audio(bad)


def test_truncated_flac(tmp_path) -> None:
    good = tmp_path / "good.flac"
    sf.write(good, (np.random.default_rng(0).standard_normal(48000) * 0.2).astype(np.float32), 16000)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(AudioError, match="bad.flac"):
        load_audio(bad)


def test_unknown_container_without_ffmpeg(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = tmp_path / "a.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"\x00" * 1000)
    with pytest.raises(AudioError, match="install ffmpeg"):
        load_audio(path)


@needs_ffmpeg
def test_ffmpeg_garbage_is_an_error(tmp_path) -> None:
    path = tmp_path / "junk.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(range(256)) * 10)
    with pytest.raises(AudioError, match="junk.m4a"):
        load_audio(path)


def test_missing_file() -> None:
    with pytest.raises(AudioError, match="/no/such/file.wav: no such file"):
        load_audio("/no/such/file.wav")


def test_a_folder_is_not_an_audio_file(tmp_path) -> None:
    with pytest.raises(AudioError, match=f"{tmp_path}: is a folder, not an audio file"):
        load_audio(tmp_path)


def test_block_converter_cut_hands_over_the_resamplers_tail() -> None:
    """At an utterance boundary (a live commit) the 16 kHz audio so far must end with the last
    sample received: ``cut`` hands over what soxr holds back, and the next stretch starts a stream
    of its own, as long as a one-shot resampling of it and as close in value."""
    from mdl_edge.runtime.audio import BlockConverter, load_audio

    rng = np.random.default_rng(0)
    t = np.arange(8000 * 2) / 8000
    first = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    second = (0.3 * np.sin(2 * np.pi * 300 * t[:12000])).astype(np.float32)
    conv = BlockConverter(8000, "stream")
    out = np.concatenate([conv(b) for b in np.array_split(first, 37)])
    assert out.size < 2 * first.size  # soxr holds its delay back...
    out = np.concatenate([out, conv.cut()])
    assert out.size == 2 * first.size, out.size  # ...and the cut hands it over
    want = load_audio(first, sample_rate=8000)
    worst = float(np.abs(out - want).max())
    assert worst < 1e-4, f"worst difference from a one-shot resampling {worst:.2e}"
    nxt = np.concatenate([conv(b) for b in np.array_split(second, 11)] + [conv.flush()])
    assert nxt.size == 2 * second.size
    worst = float(np.abs(nxt - load_audio(second, sample_rate=8000)).max())
    assert worst < 1e-4, f"after the cut: worst difference from a one-shot resampling {worst:.2e}"
