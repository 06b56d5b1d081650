"""The audio tower on ONNX Runtime: log-mel -> encoder chunks (1008-frame boundaries; a partial
last chunk runs at its own length) -> stitched 25 Hz features -> 5 Hz embeddings from the
projector. Identical (to float round-off) to the PyTorch reference's chunk-by-chunk result for
every clip length; torch-free. Both encoder variants run here: a DashengTokenizer-style graph
(``acoustic_mels > 0`` in its metadata) reads the acoustic mel rows under the semantic ones.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Container, Iterator, Sequence

import numpy as np

from . import constants as C
from .config import MAX_ACOUSTIC_MELS
from .cpu import cpu_info
from .errors import CheckpointError, ConfigError
from .heap import release_freed_memory
from .mel import log_mel
from .onnx_meta import ENCODER_FILE, FRAMES_AXIS, PRECISE_INT8_KEY, PROJECTOR_FILE, ort_session, read_metadata
from .options import resolve_threads, whole_number

logger = logging.getLogger("mdl_edge")


@dataclass(frozen=True)
class ChunkSpec:
    """One encoder call's worth of a clip: which frames, how many real patches, how many keys."""

    first_frame: int
    n_real: int  # patches of the clip in this chunk (the rest is padding)
    n_keys: int  # leading patches that may be attended to
    n_keep: int  # leading semantic rows a DashengTokenizer-style encoder keeps (the rest are zeroed)


def chunk_plan(n_samples: int) -> list[ChunkSpec]:
    """How a clip of ``n_samples`` (after 3200-sample padding) is cut into encoder chunks.

    Keys follow the reference's ``floor(L / 640)`` rule; a chunk holding only a lone masked
    last patch attends to its real patch (see ``export/reference_encoder.chunk_key_mask``).
    A DashengTokenizer-style encoder zeroes the semantic rows of masked patches in every chunk
    after the first (``n_keep``).
    """
    p, v = C.n_patches(n_samples), C.n_valid_keys(n_samples)
    plan = []
    for c in range(math.ceil(p / C.CHUNK_PATCHES)):
        start = c * C.CHUNK_PATCHES
        real = min(C.CHUNK_PATCHES, p - start)
        valid = min(max(v - start, 0), C.CHUNK_PATCHES)
        plan.append(ChunkSpec(c * C.CHUNK_FRAMES, real, valid if valid > 0 else real, real if c == 0 else min(valid, real)))
    return plan


def chunk_batch(chunks: Sequence[tuple[np.ndarray, ChunkSpec]], *, frames: int | None = None, keep: bool = False) -> dict[str, np.ndarray]:
    """Encoder inputs for ``(mel, spec)`` pairs: ``mel [B, rows, frames]`` (each chunk's real
    frames, zero-padded; ``frames`` defaults to the longest chunk's), ``n_keys [B]`` and, with
    ``keep`` (DashengTokenizer-style graphs), ``n_keep [B]``."""
    width = frames or max(spec.n_real for _, spec in chunks) * C.PATCH_FRAMES
    batch = np.zeros((len(chunks), chunks[0][0].shape[0], width), np.float32)
    for k, (mel, spec) in enumerate(chunks):
        piece = mel[:, spec.first_frame : spec.first_frame + spec.n_real * C.PATCH_FRAMES]
        batch[k, :, : piece.shape[1]] = piece
    feed = {"mel": batch, "n_keys": np.array([spec.n_keys for _, spec in chunks], np.int64)}
    if keep:
        feed["n_keep"] = np.array([spec.n_keep for _, spec in chunks], np.int64)
    return feed


def schedule(jobs: Sequence[tuple[int, ChunkSpec]], max_batch: int) -> list[list[tuple[int, ChunkSpec]]]:
    """Encoder runs for ``(clip, chunk)`` jobs: chunks of one length share a run (at most
    ``max_batch``), so no chunk is padded to another's length; full chunks come first, then each
    partial length in order of first appearance (a clip's own chunks keep their order)."""
    by_width: dict[int, list[tuple[int, ChunkSpec]]] = {}
    for job in sorted(jobs, key=lambda j: j[1].n_real != C.CHUNK_PATCHES):  # stable: full chunks first
        by_width.setdefault(job[1].n_real, []).append(job)
    return [group[b : b + max_batch] for group in by_width.values() for b in range(0, len(group), max_batch)]


class AudioEncoder:
    """``encoder.onnx`` + ``projector.onnx`` of one checkpoint, checked to belong together.

    ``encoder_file`` / ``projector_file``: names inside ``model_dir``; ``threads``: ORT intra-op
    threads (default: the cores available); ``max_batch``: chunks per ``session.run`` (default 1
    on the CPU, 8 on CUDA); ``provider``: ``"cpu"`` or ``"cuda"``; ``optimized_model_dir``: where
    ORT may save its optimized graphs; ``static_frames``: pin the graph's time axis to 1008 frames
    and pad every partial chunk to it (for backends that need static shapes; the results at real
    positions are the same, the padded frames cost compute). Graphs exported with a fixed
    1008-frame axis always run that way. ``precise_int8``: ONNX Runtime's exact u8 x u8 int8
    kernels instead of the u8 x s8 ones, whose 16-bit sums can saturate on x86-64 CPUs without
    VNNI; default: on exactly there (:attr:`cpu.CpuInfo.int8_saturates`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        encoder_file: str = ENCODER_FILE,
        projector_file: str = PROJECTOR_FILE,
        threads: int | None = None,
        max_batch: int | None = None,
        provider: str = "cpu",
        optimized_model_dir: str | Path | None = None,
        static_frames: bool = False,
        precise_int8: bool | None = None,
    ) -> None:
        d = Path(model_dir)
        if precise_int8 is None:
            precise_int8 = cpu_info().int8_saturates
        self.precise_int8 = bool(precise_int8)
        if self.precise_int8:
            logger.info("int8 encoder kernels: exact u8 x u8 (%s=1; this CPU has no VNNI)", PRECISE_INT8_KEY)
        if max_batch is None:
            # On a CPU a batch of chunks runs no faster than one chunk at a time (compute-bound:
            # 5.0 vs 5.1 s for 3 chunks at 2 threads) but holds a batch of activations (+0.06 GB
            # per extra chunk at 0.6B); a GPU needs the batch to fill its cores.
            max_batch = 8 if provider == "cuda" else 1
        whole_number("max_batch", max_batch)
        self.threads = resolve_threads(threads)
        self.max_batch = max_batch
        opt = Path(optimized_model_dir) if optimized_model_dir else None
        self.encoder_path, self.projector_path = d / encoder_file, d / projector_file
        self.encoder = ort_session(self.encoder_path, threads=self.threads, provider=provider, optimized_dir=opt, static_frames=static_frames,
                                precise_int8=self.precise_int8)
        self.projector = ort_session(self.projector_path, threads=self.threads, provider=provider, optimized_dir=opt)
        self.meta = read_metadata(self.encoder, self.encoder_path)
        self.projector_meta = read_metadata(self.projector, self.projector_path)
        self._check()

    def _check(self) -> None:
        m, pm = self.meta, self.projector_meta
        if m.get("kind") != "encoder" or pm.get("kind") != "projector":
            raise CheckpointError(f"{self.encoder_path}: expected an encoder and a projector, got {m.get('kind')!r} and {pm.get('kind')!r}")
        for key, want in (("n_mels", C.N_MELS), ("chunk_frames", C.CHUNK_FRAMES), ("hop_length", C.HOP_LENGTH)):
            if m.get(key) != want:
                raise CheckpointError(f"{self.encoder_path}: {key} is {m.get(key)!r}, this runtime needs {want}")
        # Graphs written before the DashengTokenizer variant existed carry no acoustic_mels: 0.
        acoustic = m.get("acoustic_mels", 0)
        if not isinstance(acoustic, int) or isinstance(acoustic, bool) or not 0 <= acoustic <= MAX_ACOUSTIC_MELS:
            raise CheckpointError(f"{self.encoder_path}: acoustic_mels is {acoustic!r}, not a bin count")
        self.acoustic_mels: int = acoustic
        self.mel_rows = C.N_MELS + acoustic
        inputs = [i.name for i in self.encoder.get_inputs()]
        want_inputs = ["mel", "n_keys", "n_keep"] if acoustic else ["mel", "n_keys"]
        if inputs != want_inputs:
            raise CheckpointError(f"{self.encoder_path}: graph inputs {inputs}, expected {want_inputs} for its metadata")
        if m.get("source_hash") != pm.get("source_hash"):
            raise CheckpointError(
                f"{self.encoder_path} and {self.projector_path} come from different checkpoints "
                f"(source hashes {m.get('source_hash')} vs {pm.get('source_hash')})"
            )
        mel_in = self.encoder.get_inputs()[0]
        out = self.encoder.get_outputs()[0]
        if mel_in.shape[1] != self.mel_rows or mel_in.shape[2] not in (C.CHUNK_FRAMES, FRAMES_AXIS) or out.shape[-1] != m.get("embed_dim"):
            raise CheckpointError(f"{self.encoder_path}: graph shapes {mel_in.shape} -> {out.shape} do not match its metadata")
        # None: each chunk at its own length; else every chunk is padded to this many frames
        self.chunk_frames: int | None = C.CHUNK_FRAMES if mel_in.shape[2] == C.CHUNK_FRAMES else None
        stacked = self.projector.get_inputs()[0].shape[-1]
        if stacked != m["embed_dim"] * C.SUBSAMPLE:
            raise CheckpointError(
                f"{self.projector_path}: takes {stacked} inputs, but the encoder gives {C.SUBSAMPLE} x {m['embed_dim']} = {m['embed_dim'] * C.SUBSAMPLE}"
            )
        self.embed_dim = int(m["embed_dim"])
        self.hidden_size = int(self.projector.get_outputs()[0].shape[-1])
        self.source_hash = str(m["source_hash"])

    def _chunk_features(
        self, mels: Sequence[np.ndarray], n_samples: Sequence[int], on_chunks: Callable[[int, int], None] | None,
        skip: Container[int] = (),
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(clip index, chunk index, features [n_real, D])`` of every chunk of every clip (but
        the first clip's chunks in ``skip``); chunks go through the encoder as :func:`schedule`
        groups them (each clip's in order) and ``on_chunks(done, total)`` follows."""
        jobs: list[tuple[int, ChunkSpec]] = []
        for i, (mel, n) in enumerate(zip(mels, n_samples)):
            if mel.ndim != 2 or mel.shape[0] != self.mel_rows:
                raise ConfigError(f"mel of clip {i}: expected [{self.mel_rows}, frames], got {list(mel.shape)}")
            if mel.shape[1] < C.n_frames(max(n, C.MIN_SAMPLES)):
                raise ConfigError(f"mel of clip {i}: {mel.shape[1]} frames, but {n} samples make {C.n_frames(max(n, C.MIN_SAMPLES))}")
            jobs += [(i, spec) for spec in chunk_plan(max(n, C.MIN_SAMPLES))
                     if not (i == 0 and spec.first_frame // C.CHUNK_FRAMES in skip)]
        done = 0
        for group in schedule(jobs, self.max_batch):
            feed = chunk_batch([(mels[i], spec) for i, spec in group], frames=self.chunk_frames, keep=self.acoustic_mels > 0)
            (feats,) = self.encoder.run(None, feed)
            release_freed_memory()  # each run's working set, before the next chunk's
            for k, (i, spec) in enumerate(group):
                yield i, spec.first_frame // C.CHUNK_FRAMES, feats[k, : spec.n_real]
            done += len(group)
            if on_chunks:
                on_chunks(done, len(jobs))

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """The log-mel this encoder reads: ``[64 + acoustic_mels, 1 + max(L, 3200) // 160]``."""
        return log_mel(wave, acoustic_mels=self.acoustic_mels, n_threads=self.threads)

    def encode_mels(
        self, mels: Sequence[np.ndarray], n_samples: Sequence[int], *, on_chunks: Callable[[int, int], None] | None = None
    ) -> list[np.ndarray]:
        """Log-mels ``[64, T_i]`` of clips with lengths ``n_samples`` -> stitched features ``[P_i, D]``.

        All chunks of all clips go through the encoder together, ``max_batch`` per run;
        ``on_chunks(done, total)`` is called after each run (for progress bars).
        """
        outs: list[dict[int, np.ndarray]] = [{} for _ in mels]
        for i, c, feats in self._chunk_features(mels, n_samples, on_chunks):
            outs[i][c] = feats
        return [np.concatenate([o[c] for c in sorted(o)]) for o in outs]

    def chunk_features(self, mel: np.ndarray, n_samples: int, *, skip: Container[int] = ()) -> dict[int, np.ndarray]:
        """Features ``[n_real, D]`` of each encoder chunk of one clip by chunk index, leaving out
        the chunks in ``skip`` (a live stream's finished chunks, already known: chunks are
        encoded independently, so a finished chunk's features do not change as audio follows)."""
        return {c: feats for _, c, feats in self._chunk_features([mel], [n_samples], None, skip)}

    def project(self, feats: np.ndarray) -> np.ndarray:
        """Stitched 25 Hz features ``[P, D]`` -> audio embeddings ``[P // 5, H]``: the trailing
        ``P mod 5`` frames of the whole sequence are dropped (groups may straddle chunks)."""
        n = feats.shape[0] // C.SUBSAMPLE
        stacked = np.ascontiguousarray(feats[: n * C.SUBSAMPLE].reshape(n, C.SUBSAMPLE * feats.shape[1]), dtype=np.float32)
        if n == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        (emb,) = self.projector.run(None, {"stacked": stacked})
        return emb

    def embed_mel(
        self, mel: np.ndarray, n_samples: int, *, timings: dict[str, float] | None = None, on_chunks: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """The log-mel of a clip of ``n_samples`` -> its audio embeddings ``[((1 + L//160)//4)//5, H]``.

        Each chunk's features are projected as soon as whole groups of 5 are stitched, so the
        25 Hz features of a long clip never sit in memory at once (for Dasheng-0.6B they are
        twice the size of the waveform). Same result as :meth:`project` of :meth:`encode_mels`.
        """
        t_enc = t_proj = 0.0
        pending = np.zeros((0, self.embed_dim), np.float32)
        out: list[np.ndarray] = []
        t = time.perf_counter()
        for _, _, feats in self._chunk_features([mel], [n_samples], on_chunks):  # in chunk order
            t1 = time.perf_counter()
            t_enc += t1 - t
            pending = np.concatenate([pending, feats])
            whole = pending.shape[0] // C.SUBSAMPLE * C.SUBSAMPLE
            out.append(self.project(pending[:whole]))
            pending = pending[whole:]
            t = time.perf_counter()
            t_proj += t - t1
        if timings is not None:
            timings.update(encoder=t_enc, projector=t_proj)
        return np.concatenate(out) if out else np.zeros((0, self.hidden_size), np.float32)

    def embed(
        self, wave: np.ndarray, *, timings: dict[str, float] | None = None, on_chunks: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """A 16 kHz mono clip -> its audio embeddings ``[((1 + L//160)//4)//5, H]``."""
        t0 = time.perf_counter()
        mel = self.log_mel(wave)
        if timings is not None:
            timings["mel"] = time.perf_counter() - t0
        return self.embed_mel(mel, wave.shape[0], timings=timings, on_chunks=on_chunks)
