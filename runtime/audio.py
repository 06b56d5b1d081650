"""Audio in: a path, bytes, file object or array -> mono float32 at 16 kHz, in bounded memory.

Files are decoded with libsndfile (soundfile): WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF; anything
else (M4A/AAC, video containers, ...) through ``ffmpeg`` when it is on PATH. Channels are
averaged to mono (librosa's ``mono=True``), integer PCM arrives scaled to [-1, 1], and other
rates are resampled with soxr's high-quality filter (librosa's default resampler). Decoding
runs block by block (:func:`iter_audio`), so an hour of audio never sits in memory as float64
or in several copies; :func:`load_audio` is the concatenation of those blocks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np

from . import constants as C
from .errors import AudioError

logger = logging.getLogger("mdl_edge")

AudioSource = Union[str, Path, bytes, bytearray, BinaryIO, np.ndarray]

#: Samples decoded per block (about 16 s at 16 kHz; a few MB whatever the file's rate).
BLOCK_FRAMES = 1 << 18

#: File name endings taken as audio when a folder is given as input: libsndfile's formats and
#: the common ones ffmpeg decodes (containers with an audio track included).
AUDIO_SUFFIXES = frozenset((
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf",
    ".w64", ".rf64", ".m4a", ".m4b", ".aac", ".wma", ".amr", ".3gp", ".mka", ".webm", ".mp4", ".mov", ".mkv",
))


def audio_files_under(folder: Path) -> list[Path]:
    """The audio files (by :data:`AUDIO_SUFFIXES`) anywhere under ``folder``, sorted by path.
    Hidden files and folders are passed over: a copied archive's ``.DS_Store`` and ``._x.wav``
    (macOS resource forks, not audio) would otherwise fail as corrupt audio."""
    def unreadable(e: OSError) -> None:
        logger.warning("%s: cannot list this folder, its files are left out: %s", e.filename, e.strerror)

    found, seen = [], set()
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back to a folder already walked: each folder once, and no endless loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: the first of two ways to a folder is the one kept
        found += [Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in AUDIO_SUFFIXES]
    return sorted(found)


class NamedBytes(bytes):
    """An audio file's bytes in memory, with the name messages give it (the CLI's ``-``: what
    came on standard input)."""

    name: str

    def __new__(cls, data: bytes, name: str) -> "NamedBytes":
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


def describe(source: AudioSource) -> str:
    """A short name for an audio source, for error messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, NamedBytes):
        return source.name
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _mono_float(x: np.ndarray, name: str, decoded: bool = False) -> np.ndarray:
    """``[n]`` or ``[n, channels]`` -> float32 mono, integers scaled to [-1, 1], checked finite."""
    if x.ndim not in (1, 2):
        raise AudioError(f"{name}: expected [samples] or [samples, channels], got shape {x.shape}")
    # integers are scaled before channels are averaged (the mean is a float)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
    elif not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"{name}: unsupported sample dtype {x.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64) if x.shape[1] > 1 else x[:, 0]
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if decoded and np.issubdtype(x.dtype, np.floating):
            raise AudioError(f"{name}: {bad} decoded samples are NaN or infinite (a float file holding NaN, or a corrupt or truncated file)")
        raise AudioError(f"{name}: {bad} samples are NaN or infinite")
    return x


class _Resampler:
    """Streaming mono resampler to 16 kHz (soxr HQ); a pass-through at 16 kHz."""

    def __init__(self, rate: int, name: str) -> None:
        if rate <= 0:
            raise AudioError(f"{name}: invalid sample rate {rate}")
        self.stream = None
        if rate != C.SAMPLE_RATE:
            import soxr

            self.stream = soxr.ResampleStream(rate, C.SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self.stream is None:
            return x
        return np.asarray(self.stream.resample_chunk(x, last=last), dtype=np.float32)


class BlockConverter:
    """Audio that arrives in blocks at any rate, mono or ``[n, channels]``, integer or float ->
    mono float32 16 kHz blocks, resampled as one continuous stream (soxr keeps its filter state
    between blocks). ``flush()`` returns the resampler's tail at the end of the stream."""

    def __init__(self, rate: int, name: str = "audio", *, decoded: bool = False) -> None:
        self.name, self.decoded = name, decoded
        self.rate = int(rate)
        self._resample = _Resampler(self.rate, name)
        self.n_in = 0  # input frames seen

    def __call__(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        self.n_in += block.shape[0] if block.ndim else 0
        return self._resample(_mono_float(block, self.name, self.decoded))

    def flush(self) -> np.ndarray:
        return self._resample(np.zeros(0, np.float32), last=True)

    def cut(self) -> np.ndarray:
        """The resampler's held-back tail now, and a fresh resampler for what follows: at an
        utterance boundary the audio so far must end with its last sample received (soxr holds
        back its filter's delay, 76 ms from 8 kHz, until the stream ends)."""
        tail = self.flush()
        self._resample = _Resampler(self.rate, self.name)
        return tail


def _blocks_16k(blocks: Iterator[np.ndarray], rate: int, name: str, decoded: bool) -> Iterator[np.ndarray]:
    convert = BlockConverter(rate, name, decoded=decoded)
    for b in blocks:
        out = convert(b)
        if out.size:
            yield out
    tail = convert.flush()
    if tail.size:
        yield tail
    if convert.n_in == 0:
        raise AudioError(f"{name}: the clip is empty (0 samples)")


def _truncation(data: bytes | None, path: Path | None) -> str | None:
    """Headers that announce more data than the file holds. libsndfile silently shortens such a
    WAV and pads such an MP3 (with silence or garbage), so read the announcements ourselves."""
    if data is not None:
        head, size = data[:8192], len(data)
    elif path is not None:
        with path.open("rb") as f:
            head = f.read(8192)
        size = path.stat().st_size
    else:
        return None
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        pos = 12
        while pos + 8 <= len(head):
            cid, clen = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
            if cid == b"data":
                if clen != 0xFFFFFFFF and pos + 8 + clen > size:
                    return f"truncated WAV: the data chunk declares {clen} bytes but the file holds {size - pos - 8}"
                return None
            pos += 8 + clen + (clen & 1)
        return None
    # MP3 with a Xing/Info header: its byte count covers the stream from the first frame on.
    start = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        start = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F))
    for tag in (b"Xing", b"Info"):
        i = head.find(tag, start)
        if i < 0 or i + 16 > len(head):
            continue
        flags = struct.unpack(">I", head[i + 4 : i + 8])[0]
        off = i + 8 + (4 if flags & 1 else 0)
        if flags & 2 and off + 4 <= len(head):
            declared = struct.unpack(">I", head[off : off + 4])[0]
            if size - start < declared * 0.99:
                return f"truncated MP3: the header declares {declared} bytes of stream but the file holds {size - start}"
        return None
    return None


def _soundfile_blocks(f, name: str) -> Iterator[tuple[np.ndarray, int]]:
    import soundfile as sf

    try:
        with sf.SoundFile(f) as snd:
            rate = snd.samplerate
            for block in snd.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True):
                yield block, rate
    except sf.LibsndfileError as e:
        raise AudioError(f"{name}: cannot decode audio: {e}") from e


def _ffmpeg_blocks(path: Path, name: str) -> Iterator[tuple[np.ndarray, int]]:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels", "-of", "json", str(path)],
        capture_output=True, text=True,
    )
    streams = json.loads(probe.stdout or "{}").get("streams", []) if probe.returncode == 0 else []
    if not streams:
        detail = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no audio stream"
        detail = detail.removeprefix(f"{path}: ")  # ffmpeg names the file it read: the name comes first already
        raise AudioError(f"{name}: cannot decode audio with ffmpeg: {detail}")
    rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-acodec", "pcm_f32le", "-"],
            stdout=subprocess.PIPE, stderr=err,
        )
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(BLOCK_FRAMES * channels * 4):
                usable = len(chunk) - len(chunk) % (channels * 4)
                yield np.frombuffer(chunk[:usable], dtype="<f4").reshape(-1, channels), rate
        finally:
            proc.stdout.close() if proc.stdout else None
            code = proc.wait()
        if code != 0:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip().splitlines()
            raise AudioError(f"{name}: ffmpeg failed to decode it: {msg[-1].removeprefix(f'{path}: ') if msg else f'exit code {code}'}")


def _decoded_blocks(source: AudioSource, name: str) -> Iterator[tuple[np.ndarray, int]]:
    """(block [frames, channels], sample rate) from soundfile, or ffmpeg as the fallback."""
    import soundfile as sf

    path = Path(source) if isinstance(source, (str, Path)) else None
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else None
    if path is not None and path.is_dir():
        raise AudioError(f"{name}: is a folder, not an audio file")
    if path is not None and not path.is_file():
        raise AudioError(f"{name}: no such file")
    if data is None and path is None:  # a file object: read it once, it may not be seekable
        try:
            data = source.read()  # type: ignore[union-attr]
        except Exception as e:
            raise AudioError(f"{name}: cannot read from the file object: {e}") from e
        if not isinstance(data, (bytes, bytearray)):
            raise AudioError(f"{name}: the file object must be opened in binary mode")
    if data is not None and len(data) == 0:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    if path is not None and path.stat().st_size == 0:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    truncated = _truncation(data, path)
    if truncated:
        raise AudioError(f"{name}: {truncated}")
    try:
        sf.info(io.BytesIO(data) if data is not None else str(path))
        readable = True
    except sf.LibsndfileError as e:
        readable, sf_error = False, str(e)
    if readable:
        yield from _soundfile_blocks(io.BytesIO(data) if data is not None else str(path), name)
        return
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise AudioError(
            f"{name}: cannot decode audio: libsndfile reads WAV/FLAC/OGG/MP3 only ({sf_error.strip()}); "
            "install ffmpeg (e.g. apt-get install ffmpeg) to read M4A/AAC/Opus/video files"
        )
    if path is not None:
        yield from _ffmpeg_blocks(path, name)
        return
    fd, tmp = tempfile.mkstemp(suffix=".audio")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)  # type: ignore[arg-type]
        yield from _ffmpeg_blocks(Path(tmp), name)
    finally:
        os.unlink(tmp)


def iter_audio(source: AudioSource, *, sample_rate: int | None = None) -> Iterator[np.ndarray]:
    """Decode ``source`` block by block into mono float32 16 kHz pieces.

    Arrays need their ``sample_rate`` (checked, never assumed); files carry their own, and a
    ``sample_rate`` given with a file must agree with it. Raises :class:`AudioError` naming the
    source for anything unreadable, empty or non-finite.
    """
    name = describe(source)
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError(f"{name}: pass sample_rate= with an array (it is checked, not assumed)")
        if source.ndim == 2 and source.shape[0] < source.shape[1] and source.shape[0] <= 8:
            raise AudioError(f"{name}: expected [samples, channels]; got what looks like [channels, samples] (transpose it)")
        yield from _blocks_16k(iter([np.asarray(source)]), sample_rate, name, decoded=False)
        return
    rate_seen: list[int] = []

    def blocks() -> Iterator[np.ndarray]:
        for block, rate in _decoded_blocks(source, name):
            if not rate_seen:
                rate_seen.append(rate)
                if sample_rate is not None and sample_rate != rate:
                    raise AudioError(f"{name}: the file is {rate} Hz but sample_rate={sample_rate} was given")
            yield block

    it = blocks()
    try:
        first = next(it)
    except StopIteration:
        raise AudioError(f"{name}: the clip is empty (0 samples)") from None
    yield from _blocks_16k(_chain(first, it), rate_seen[0], name, decoded=True)


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def expected_samples(source: AudioSource) -> int | None:
    """Length at 16 kHz that a file's (or in-memory file's) header announces (None when unknown)."""
    if not isinstance(source, (str, Path, bytes, bytearray)):
        return None
    import soundfile as sf

    try:
        info = sf.info(str(source) if isinstance(source, (str, Path)) else io.BytesIO(source))
    except Exception:
        return None
    return int(round(info.frames * C.SAMPLE_RATE / info.samplerate)) if info.frames > 0 else None


def load_audio(source: AudioSource, *, sample_rate: int | None = None) -> np.ndarray:
    """Decode ``source`` to one mono float32 16 kHz waveform (see :func:`iter_audio`)."""
    parts = list(iter_audio(source, sample_rate=sample_rate))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def demo_clip(seconds: float = 10.0, *, seed: int = 0) -> np.ndarray:
    """A generated 16 kHz test clip: a rising chirp, a two-tone 'bell', noise bursts and a
    syllable-like amplitude-modulated harmonic voice. Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * C.SAMPLE_RATE))
    t = np.arange(n) / C.SAMPLE_RATE
    chirp = 0.2 * np.sin(2 * np.pi * (200 * t + 300 * t**2 / max(seconds, 1e-3)))
    bell = 0.15 * (np.sin(2 * np.pi * 880 * t) + 0.5 * np.sin(2 * np.pi * 1320 * t)) * np.exp(-3 * (t % 2.0))
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / C.SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2 * 0.1
    bursts = rng.standard_normal(n) * 0.05 * ((t % 3.0) < 0.15)
    return (chirp + bell + voice + bursts).astype(np.float32)
