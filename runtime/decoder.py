"""The Qwen decoder on llama.cpp (llama-cpp-python's low-level API), fed audio embeddings.

llama-cpp-python's high-level ``Llama`` class takes tokens only; MiDashengLM's prompt holds
audio embeddings in place of the ``<|AUDIO|>`` placeholders. So the prompt is evaluated in
segments, token batches for text and ``batch.embd`` batches for audio, at consecutive positions
exactly as the reference places them. Handles are owned here and freed by ``close()``.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import CheckpointError, ConfigError, MdlEdgeError

logger = logging.getLogger("mdl_edge")
_llama_logger = logging.getLogger("mdl_edge.llama_cpp")

_GGUF_MAGIC = b"GGUF"
_GGUF_TYPE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # scalar value types


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """Validate a GGUF file's header and return its key/value metadata (arrays as lengths, except
    short ones). Checks the magic, the version, and that the tensor data fits in the file — before
    llama.cpp parses it (cf. CVE-2024-21802 / CVE-2024-21836)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
    size = path.stat().st_size
    with f:
        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise CheckpointError(f"{path}: truncated GGUF (header ends early)")
            return b

        def string() -> str:
            (n,) = struct.unpack("<Q", read(8))
            if n > 1 << 26:
                raise CheckpointError(f"{path}: corrupt GGUF (a string of {n} bytes)")
            return read(n).decode("utf-8", errors="replace")

        def value(t: int) -> object:
            if t == 8:
                return string()
            if t == 9:
                (et,) = struct.unpack("<I", read(4))
                (n,) = struct.unpack("<Q", read(8))
                if n > 1 << 24:
                    raise CheckpointError(f"{path}: corrupt GGUF (an array of {n} items)")
                items = [value(et) for _ in range(n)]
                return items if n <= 16 else len(items)
            if t not in _GGUF_TYPE_SIZES:
                raise CheckpointError(f"{path}: corrupt GGUF (value type {t})")
            fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}[t]
            return struct.unpack(fmt, read(_GGUF_TYPE_SIZES[t]))[0]

        if read(4) != _GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
        (version,) = struct.unpack("<I", read(4))
        if version not in (2, 3):
            raise CheckpointError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = struct.unpack("<QQ", read(16))
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise CheckpointError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack("<I", read(4))
            meta[key] = value(t)
        max_end = 0
        for _ in range(n_tensors):
            string()
            (nd,) = struct.unpack("<I", read(4))
            if nd > 4:
                raise CheckpointError(f"{path}: corrupt GGUF tensor info ({nd} dims)")
            read(8 * nd)
            read(4)
            (offset,) = struct.unpack("<Q", read(8))
            max_end = max(max_end, offset)
        align = int(meta.get("general.alignment", 32))  # type: ignore[arg-type]
        data_start = (f.tell() + align - 1) // align * align
        if data_start + max_end > size:
            raise CheckpointError(f"{path}: truncated GGUF (tensor data runs past the end of the file)")
    return meta


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding options. Greedy unless ``temperature > 0``; ``seed`` makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, ok in (
            ("temperature", self.temperature >= 0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("min_p", 0 <= self.min_p < 1),
            ("repetition_penalty", self.repetition_penalty > 0),
        ):
            if not ok:
                raise ConfigError(f"invalid sampling option {name}={getattr(self, name)!r}")


class Utf8Pieces:
    """Joins token byte pieces into text, holding back an incomplete UTF-8 sequence."""

    def __init__(self) -> None:
        self._pending = b""

    def push(self, piece: bytes) -> str:
        data = self._pending + piece
        # keep up to 3 trailing bytes that may start a multi-byte character
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


_LOG_CALLBACK = None  # keep the ctypes callback alive for the process lifetime
_BACKEND_LOCK = threading.Lock()
_BACKEND_READY = False


def _init_backend() -> object:
    """Import llama_cpp once, route llama.cpp's native log into Python logging (quiet unless
    the ``mdl_edge.llama_cpp`` logger is set to DEBUG), and initialise the backend."""
    global _LOG_CALLBACK, _BACKEND_READY
    try:
        import llama_cpp
    except ImportError as e:
        raise MdlEdgeError(f"the decoder needs llama-cpp-python (pip install llama-cpp-python): {e}") from e
    with _BACKEND_LOCK:
        if not _BACKEND_READY:

            @llama_cpp.llama_log_callback
            def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
                msg = text.decode("utf-8", errors="replace").rstrip()
                if msg:
                    # llama.cpp's warnings are routine chatter (e.g. quantization fallbacks); only its
                    # errors reach WARNING, and our own exceptions say what failed.
                    _llama_logger.log(logging.WARNING if level == 4 else logging.DEBUG, msg)

            _LOG_CALLBACK = _log
            llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
    return llama_cpp


MIN_CTX = 64  # smallest context accepted (llama.cpp itself rounds small sizes up to 256)


def extra_bufts_safe() -> bool:
    """Whether ggml's extra CPU buffer types (weights repacked for the CPU's SIMD, and AMX tiles)
    are safe to use with this llama.cpp build.

    The AMX buffer type crashes in ``ggml_backend_amx_mul_mat`` on quantized weights whenever a
    batch has more than one token (llama.cpp issue #20824), and a native build on an AMX Xeon
    compiles it in; without AMX the extra types only repack weights.
    """
    info = _init_backend().llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" not in info


@dataclass(frozen=True)
class Segment:
    """A run of prompt input: text token ids, or audio embeddings ``[n, hidden]``."""

    tokens: tuple[int, ...] = ()
    embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens) if self.embeddings is None else int(self.embeddings.shape[0])


def split_prompt(ids: Sequence[int], audio: Sequence[np.ndarray], audio_token_id: int) -> list[Segment]:
    """Prompt ids with ``<|AUDIO|>`` runs -> alternating token and embedding segments.

    The i-th run of placeholders takes ``audio[i]``; its length must match."""
    segments: list[Segment] = []
    run: list[int] = []
    k = 0
    i = 0
    while i < len(ids):
        if ids[i] != audio_token_id:
            run.append(ids[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == audio_token_id:
            j += 1
        if k >= len(audio):
            raise ConfigError("the prompt has more audio placeholder runs than audio clips")
        emb = np.ascontiguousarray(audio[k], dtype=np.float32)
        if emb.shape[0] != j - i:
            raise ConfigError(f"audio clip {k} has {emb.shape[0]} embeddings but its placeholder run has {j - i} tokens")
        if run:
            segments.append(Segment(tokens=tuple(run)))
            run = []
        segments.append(Segment(embeddings=emb))
        k += 1
        i = j
    if run:
        segments.append(Segment(tokens=tuple(run)))
    if k != len(audio):
        raise ConfigError(f"{len(audio)} audio clips given but the prompt has {k} placeholder runs")
    return segments


class LlamaDecoder:
    """A GGUF decoder in one llama.cpp context (not thread-safe: one generation at a time; the
    lock serialises concurrent callers).

    ``f32_kv=True`` and flash attention off give logits equal to transformers' to ~1e-5 with an
    f32 GGUF (parity mode); the default f16 KV cache is faster and uses half the memory.
    ``extra_bufts=True`` lets ggml repack weights for this CPU's SIMD kernels: measured on the
    2-core AVX2 machine, Q8_0 prefill 1.4x faster, Q4_K_M unchanged, ~0.2 GB more memory (the
    mapped file pages stay resident beside the repacked copy). Off by default; refused on builds
    with AMX (see :func:`extra_bufts_safe`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        n_batch: int = 512,
        f32_kv: bool = False,
        flash_attn: bool = False,
        extra_bufts: bool = False,
    ) -> None:
        from .mel import default_threads

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: not found")
        self.meta = read_gguf_metadata(self.path)
        self.arch = str(self.meta.get("general.architecture"))
        if self.arch not in ("qwen2", "qwen3"):
            raise CheckpointError(f"{self.path}: architecture {self.arch!r} is not a MiDashengLM decoder (qwen2 / qwen3)")
        L = _init_backend()
        self._L = L
        self.lock = threading.RLock()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if extra_bufts and not extra_bufts_safe():
            raise ConfigError(
                "extra_bufts=True: this llama.cpp build has AMX, whose buffer type crashes on quantized weights for "
                "batches of more than one token (llama.cpp issue #20824); rebuild with -DGGML_AMX_INT8=OFF or leave it off"
            )
        if hasattr(mparams, "use_extra_bufts"):
            mparams.use_extra_bufts = extra_bufts
        self._model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise CheckpointError(f"{self.path}: llama.cpp could not load it (see the mdl_edge.llama_cpp log)")
        self._ctx = None
        self._batches: dict[tuple[int, bool], object] = {}
        try:
            cparams = L.llama_context_default_params()
            cparams.n_batch = n_batch
            cparams.n_ubatch = n_batch
            cparams.n_threads = cparams.n_threads_batch = threads or default_threads()
            if f32_kv:
                cparams.type_k = cparams.type_v = L.GGML_TYPE_F32
            if hasattr(cparams, "flash_attn_type"):
                cparams.flash_attn_type = 1 if flash_attn else 0
            else:
                cparams.flash_attn = flash_attn
            self._cparams = cparams
            self._vocab = L.llama_model_get_vocab(self._model)
            self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
            self.n_embd = L.llama_model_n_embd(self._model)
            self.n_ctx_train = L.llama_model_n_ctx_train(self._model)
            self.n_batch = n_batch
            self._new_context(n_ctx)
        except BaseException:
            self.close()
            raise
        self.last_stop_reason = ""

    def _new_context(self, n_ctx: int) -> None:
        if n_ctx < MIN_CTX:
            raise ConfigError(f"n_ctx must be at least {MIN_CTX} positions, got {n_ctx}")
        L = self._L
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        self._cparams.n_ctx = n_ctx
        self._ctx = L.llama_init_from_model(self._model, self._cparams)
        if not self._ctx:
            raise CheckpointError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = L.llama_n_ctx(self._ctx)
        self._cached: list[Segment] = []  # what the KV cache holds, as segments
        self._n_past = 0

    def resize(self, n_ctx: int) -> None:
        """Recreate the context with room for ``n_ctx`` positions (the KV cache is emptied; the
        model stays loaded). The KV cache costs memory in proportion to ``n_ctx``."""
        with self.lock:
            self._new_context(n_ctx)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        L = self._L
        for b in self._batches.values():
            L.llama_batch_free(b)
        self._batches.clear()
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaDecoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special tokens parsed when ``special``)."""
        L = self._L
        raw = text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self._vocab, raw, len(raw), buf, len(buf), False, special)
        if n < 0:
            buf = (L.llama_token * (-n))()
            n = L.llama_tokenize(self._vocab, raw, len(raw), buf, len(buf), False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as empty)."""
        L = self._L
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # -- evaluation -----------------------------------------------------------------------
    def _batch(self, embd: bool) -> object:
        key = (self.n_batch, embd)
        if key not in self._batches:
            self._batches[key] = self._L.llama_batch_init(self.n_batch, self.n_embd if embd else 0, 1)
        return self._batches[key]

    def _decode(self, seg: Segment, pos: int, want_logits: bool) -> None:
        L = self._L
        n_total = len(seg)
        for start in range(0, n_total, self.n_batch):
            n = min(self.n_batch, n_total - start)
            b = self._batch(seg.embeddings is not None)
            b.n_tokens = n
            if seg.embeddings is not None:
                chunk = np.ascontiguousarray(seg.embeddings[start : start + n], dtype=np.float32)
                if chunk.shape[1] != self.n_embd:
                    raise ConfigError(f"audio embeddings are {chunk.shape[1]}-d but {self.path.name} takes {self.n_embd}-d input")
                ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            else:
                for k in range(n):
                    b.token[k] = seg.tokens[start + k]
            for k in range(n):
                b.pos[k] = pos + start + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = 0
                b.logits[k] = want_logits and start + k == n_total - 1
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                raise MdlEdgeError(f"llama_decode failed (code {rc}) at position {pos + start}")

    def evaluate(self, segments: Sequence[Segment]) -> int:
        """Bring the KV cache to ``segments`` (reusing the longest cached prefix); returns the
        number of positions that had to be evaluated. Logits of the last position are ready."""
        total = sum(len(s) for s in segments)
        if total == 0:
            raise ConfigError("empty prompt")
        if total >= self.n_ctx:
            raise ConfigError(f"the prompt has {total} positions but the context holds {self.n_ctx} (raise n_ctx)")
        keep, pos = 0, 0
        for old, new in zip(self._cached, segments):
            if _same(old, new):
                keep += 1
                pos += len(new)
            else:
                break
        if keep == len(segments):  # identical prompt: re-evaluate its last position for logits
            keep -= 1
            pos -= len(segments[-1])
        L = self._L
        L.llama_memory_seq_rm(L.llama_get_memory(self._ctx), 0, pos, -1)
        self._cached = list(segments[:keep])
        self._n_past = pos
        for i, seg in enumerate(segments[keep:]):
            self._decode(seg, self._n_past, want_logits=keep + i == len(segments) - 1)
            self._n_past += len(seg)
            self._cached.append(seg)
        return total - sum(len(s) for s in segments[:keep])

    def reset(self) -> None:
        """Empty the KV cache (the next prompt is evaluated from scratch)."""
        with self.lock:
            self._L.llama_memory_seq_rm(self._L.llama_get_memory(self._ctx), 0, 0, -1)
            self._cached = []
            self._n_past = 0

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated position, ``[n_vocab]`` float32 (a copy)."""
        ptr = self._L.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _sampler(self, opts: SamplingOptions) -> object:
        L = self._L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if opts.repetition_penalty != 1.0:
            args = (64, opts.repetition_penalty, 0.0, 0.0)  # last 64 tokens, repeat penalty only
            if len(L.llama_sampler_init_penalties.argtypes) == 5:  # bindings that still take n_vocab first
                args = (self.n_vocab, *args)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(*args))
        if opts.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if opts.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(opts.top_k))
        if opts.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(opts.top_p, 1))
        if opts.min_p > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(opts.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(opts.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(opts.seed & 0xFFFFFFFF))
        return chain

    def generate(
        self,
        segments: Sequence[Segment],
        *,
        max_new_tokens: int = 256,
        stop_ids: Sequence[int] = (),
        sampling: SamplingOptions = SamplingOptions(),
    ) -> Iterator[int]:
        """Evaluate the prompt (prefix-cached) and yield new token ids until a stop id (not
        yielded) or ``max_new_tokens``. Tokens are appended to the cache as they are generated."""
        with self.lock:
            self.evaluate(segments)
            yield from self._continue(max_new_tokens, stop_ids, sampling)

    def _continue(self, max_new_tokens: int, stop_ids: Sequence[int], sampling: SamplingOptions) -> Iterator[int]:
        """Sample from the logits of the last evaluated position onwards."""
        L = self._L
        smpl = self._sampler(sampling)
        stop = set(stop_ids)
        self.last_stop_reason = "max_new_tokens"
        try:
            for _ in range(max_new_tokens):
                tok = int(L.llama_sampler_sample(smpl, self._ctx, -1))
                if tok in stop:
                    self.last_stop_reason = "stop_token"
                    return
                yield tok
                if self._n_past + 1 >= self.n_ctx:
                    raise ConfigError(f"generation reached the context size ({self.n_ctx}); raise n_ctx")
                seg = Segment(tokens=(tok,))
                self._decode(seg, self._n_past, want_logits=True)
                self._n_past += 1
                self._cached.append(seg)
        finally:
            L.llama_sampler_free(smpl)

    def generate_text(
        self,
        segments: Sequence[Segment],
        *,
        max_new_tokens: int = 256,
        stop_ids: Sequence[int] = (),
        sampling: SamplingOptions = SamplingOptions(),
        on_text: Callable[[str], None] | None = None,
    ) -> "DecodeResult":
        """Generate, calling ``on_text`` with each new piece of text as soon as it is complete
        UTF-8 (a character split across tokens is held back until its last byte arrives)."""
        with self.lock:
            t0 = time.perf_counter()
            evaluated = self.evaluate(segments)
            t_prefill = time.perf_counter() - t0
            pieces = Utf8Pieces()
            tokens: list[int] = []
            text: list[str] = []
            t1 = time.perf_counter()
            # the prompt was evaluated just above (timed as prefill): sample straight on from it
            for tok in self._continue(max_new_tokens, stop_ids, sampling):
                tokens.append(tok)
                piece = pieces.push(self.piece(tok))
                if piece:
                    text.append(piece)
                    if on_text:
                        on_text(piece)
            tail = pieces.flush()
            if tail:
                text.append(tail)
                if on_text:
                    on_text(tail)
            t_decode = time.perf_counter() - t1
        return DecodeResult("".join(text), tuple(tokens), self.last_stop_reason, sum(len(s) for s in segments), evaluated, t_prefill, t_decode)


@dataclass(frozen=True)
class DecodeResult:
    """One generation: text, token ids, why it stopped, prompt size and timings (seconds)."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    n_prompt: int
    n_evaluated: int  # prompt positions actually evaluated (the rest came from the KV cache)
    prefill_s: float
    decode_s: float


def _same(a: Segment, b: Segment) -> bool:
    if (a.embeddings is None) != (b.embeddings is None):
        return False
    if a.embeddings is None:
        return a.tokens == b.tokens
    return a.embeddings is b.embeddings or (a.embeddings.shape == b.embeddings.shape and bool(np.array_equal(a.embeddings, b.embeddings)))
