"""``AudioLM``: the whole runtime behind one class, built from a bundle folder (torch-free).

audio -> mono 16 kHz -> log-mel (C++) -> encoder chunks (ONNX Runtime) -> stitch -> projector ->
prompt with audio embeddings -> llama.cpp generation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import constants as C
from .audio import AudioSource, load_audio
from .bundle import Bundle
from .decoder import DecodeResult, LlamaDecoder, SamplingOptions, split_prompt
from .encoder import AudioEncoder
from .errors import CheckpointError, ConfigError
from .prompt import PromptFormat, user_message

logger = logging.getLogger("mdl_edge")

# The automatic decoder context starts at, and grows in steps of, this many positions: a clip
# up to ~45 s plus 256 new tokens fits the first step, and the f16 KV cache of Qwen3-0.6B
# costs 0.06 GB per step (0.47 GB for a fixed 4096).
AUTO_CTX_STEP = 512

CAPTION_PROMPT = "Caption the audio."
TRANSCRIBE_PROMPT = "Transcribe the speech into text"


@dataclass(frozen=True)
class Result:
    """One answer about one clip."""

    text: str
    token_ids: tuple[int, ...]
    n_audio_tokens: int
    audio_seconds: float
    stop_reason: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def tokens_per_second(self) -> float:
        """Decode rate (new tokens / decode time)."""
        return len(self.token_ids) / self.timings["decode"] if self.timings.get("decode") else 0.0


class AudioLM:
    """MiDashengLM on a CPU from a bundle made by ``mdl-edge export``.

    Keyword options: ``threads`` (default: the cores available), ``encoder`` / ``decoder``
    (variant names from the bundle's manifest; default: the manifest's defaults), ``n_ctx``
    (decoder context in positions; default: automatic, starting at ``AUTO_CTX_STEP`` and growing
    when a request needs more), ``provider`` (``"cpu"`` or ``"cuda"`` for the encoder).

    One instance is safe to share between threads: generations are serialised by a lock (one
    llama.cpp context). For parallel work create one ``AudioLM`` per thread.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        encoder: str | None = None,
        decoder: str | None = None,
        n_ctx: int | None = None,
        provider: str = "cpu",
    ) -> None:
        self.bundle = Bundle.open(path)
        m = self.bundle.manifest
        self.encoder_variant, enc_path = self.bundle.variant("encoder", encoder)
        self.decoder_variant, dec_path = self.bundle.variant("decoder", decoder)
        self.encoder = AudioEncoder(self.bundle.dir, encoder_file=enc_path.name, threads=threads, provider=provider)
        if self.encoder.source_hash != m["source_hash"]:
            raise CheckpointError(f"{enc_path}: made from another checkpoint than this bundle ({self.encoder.source_hash} vs {m['source_hash']})")
        self._auto_ctx = n_ctx is None
        self.decoder = LlamaDecoder(dec_path, n_ctx=n_ctx or AUTO_CTX_STEP, threads=threads)
        try:
            gguf_hash = self.decoder.meta.get("mdl_edge.source_hash")
            if gguf_hash != m["source_hash"]:
                raise CheckpointError(
                    f"{dec_path}: this decoder was made from another checkpoint (source hash {gguf_hash}) than the "
                    f"bundle's encoder ({m['source_hash']}); re-export the bundle"
                )
            if self.decoder.n_embd != self.encoder.hidden_size:
                raise CheckpointError(f"{dec_path}: decoder width {self.decoder.n_embd} != projector output {self.encoder.hidden_size}")
            self.prompt = PromptFormat.from_dir(self.bundle.dir)
            if self.prompt.special.audio != m["tokens"]["audio"] or self.decoder.meta.get("mdl_edge.audio_token_id") != m["tokens"]["audio"]:
                raise CheckpointError(f"{self.bundle.dir}: the tokenizer, decoder and manifest disagree on the <|AUDIO|> token id")
        except BaseException:
            self.decoder.close()
            raise
        self._lock = threading.RLock()
        self._cache_key: bytes | None = None
        self._cache_emb: np.ndarray | None = None

    def _fit_context(self, need: int) -> None:
        """With the automatic context size, grow the llama.cpp context (in AUTO_CTX_STEP steps,
        up to the model's training length) so that ``need`` positions fit."""
        if not self._auto_ctx or need <= self.decoder.n_ctx:
            return
        limit = max(self.decoder.n_ctx_train, AUTO_CTX_STEP)
        if need > limit:
            raise ConfigError(f"this request needs {need} positions but the decoder was trained on {limit}; shorten the audio or max_new_tokens")
        size = min(-(-need // AUTO_CTX_STEP) * AUTO_CTX_STEP, limit)
        logger.info("growing the decoder context from %d to %d positions", self.decoder.n_ctx, size)
        self.decoder.resize(size)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the llama.cpp context and model."""
        self.decoder.close()

    def __enter__(self) -> "AudioLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- audio -------------------------------------------------------------------------------
    def embed(
        self, wave: np.ndarray, timings: dict[str, float] | None = None, on_chunks: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """Audio embeddings of a 16 kHz clip; the last clip's are cached for follow-up questions."""
        key = hashlib.blake2b(np.ascontiguousarray(wave).view(np.uint8), digest_size=16).digest()
        if key == self._cache_key and self._cache_emb is not None:
            if timings is not None:
                timings.update(mel=0.0, encoder=0.0, projector=0.0)
            return self._cache_emb
        emb = self.encoder.embed(wave, timings=timings, on_chunks=on_chunks)
        self._cache_key, self._cache_emb = key, emb
        return emb

    # -- generation --------------------------------------------------------------------------
    def generate(
        self,
        audio: AudioSource,
        prompt: str,
        *,
        sample_rate: int | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        audio_first: bool = False,
        messages: list[dict[str, Any]] | None = None,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
        on_chunks: Callable[[int, int], None] | None = None,
    ) -> Result:
        """Answer ``prompt`` about ``audio`` (a path, bytes, file object, or array with
        ``sample_rate``). Greedy by default; ``on_text`` receives the text as it is generated;
        ``ignore_eos`` generates exactly ``max_new_tokens`` (for benchmarks); ``on_chunks(done,
        total)`` reports encoder progress on long audio."""
        sampling = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        wave = load_audio(audio, sample_rate=sample_rate)
        timings["decode_audio"] = time.perf_counter() - t0
        with self._lock:
            emb = self.embed(wave, timings, on_chunks)
            msgs = messages or user_message(prompt, audio_first=audio_first)
            ids = self.prompt.encode(msgs, [emb.shape[0]])
            segments = split_prompt(ids, [emb], self.prompt.special.audio)
            self._fit_context(len(ids) + max_new_tokens + 1)
            first: list[float] = []
            t_gen = time.perf_counter()

            def seen(piece: str) -> None:
                if not first:
                    first.append(time.perf_counter() - t_gen)
                if on_text:
                    on_text(piece)

            res: DecodeResult = self.decoder.generate_text(
                segments, max_new_tokens=max_new_tokens, stop_ids=() if ignore_eos else self.prompt.stop_ids, sampling=sampling, on_text=seen
            )
        timings.update(prefill=res.prefill_s, decode=res.decode_s)
        timings["time_to_first_token"] = timings["decode_audio"] + timings["mel"] + timings["encoder"] + timings["projector"] + (first[0] if first else res.prefill_s)
        timings["total"] = time.perf_counter() - t0
        return Result(res.text, res.token_ids, int(emb.shape[0]), wave.size / C.SAMPLE_RATE, res.stop_reason, timings)

    def stream(self, audio: AudioSource, prompt: str, **options: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they come (runs in a worker thread)."""
        import queue

        q: "queue.Queue[object]" = queue.Queue()
        done = object()

        def work() -> None:
            try:
                self.generate(audio, prompt, on_text=q.put, **options)
            except BaseException as e:  # re-raised in the caller's thread
                q.put(e)
            finally:
                q.put(done)

        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def caption(self, audio: AudioSource, **options: Any) -> Result:
        """Caption a clip (the paper's prompt ``"Caption the audio."``)."""
        return self.generate(audio, CAPTION_PROMPT, **options)

    def transcribe(self, audio: AudioSource, language: str | None = None, **options: Any) -> Result:
        """Transcribe speech; ``language`` (e.g. ``"en"``, ``"zh"``) adds the ``<|xx|>`` tag."""
        return self.generate(audio, TRANSCRIBE_PROMPT + (f" <|{language}|>" if language else ""), **options)

    def ask(self, audio: AudioSource, question: str, **options: Any) -> Result:
        """Answer a question about a clip. Several questions about one clip reuse its encoding;
        with ``audio_first=True`` they also reuse the decoder's evaluated audio prefix."""
        return self.generate(audio, question, **options)
