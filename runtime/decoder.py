"""The Qwen decoder on llama.cpp (llama-cpp-python's low-level API), fed audio embeddings.

llama-cpp-python's high-level ``Llama`` class takes tokens only; MiDashengLM's prompt holds
audio embeddings in place of the ``<|AUDIO|>`` placeholders, and a llama.cpp batch holds either
tokens or embeddings. So the prompt's text tokens are turned into their ``token_embd`` rows
(dequantized as llama.cpp's lookup does) and the whole prompt, or the part of it not already in
the KV cache, is one ``batch.embd`` batch at consecutive positions exactly as the reference places
them: one pass over the weights instead of one per segment. Handles are owned here and freed by
``close()``.

A generation is a :class:`Stream`: text pieces as they are produced, then a result with the
token ids and the stop reason. One lock guards the llama.cpp context; a stream holds it while
it runs, and closing the stream early releases it at once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from .errors import CheckpointError, ConfigError, ContextLengthError, MdlEdgeError, OptionError
from .gguf_meta import KEY_ARCHITECTURE, TokenEmbeddings, read_gguf_header
from .heap import release_freed_memory
from .kv_state import KV_CACHE_DTYPE, SequenceBlob, restore_sequence, save_sequence
from .options import DEFAULT_MAX_NEW_TOKENS, MIN_CTX, SamplingOptions, resolve_threads, whole_number
from .prefill import MIN_PREFILL_POSITIONS, PrefillEngine
from .prompt import Segment, same_segment
from .sampling import SequenceStep
from .stream import Stream

logger = logging.getLogger("mdl_edge")
_llama_logger = logging.getLogger("mdl_edge.llama_cpp")

# With the automatic context size, the context starts at, and grows in steps of, this many
# positions: a clip up to ~45 s plus 256 new tokens fits the first step, and the f16 KV cache of
# Qwen3-0.6B costs 0.06 GB per step (0.47 GB for a fixed 4096).
AUTO_CTX_STEP = 512


def context_steps(positions: int) -> int:
    """The automatic context size that holds ``positions``: whole :data:`AUTO_CTX_STEP` steps."""
    return -(-positions // AUTO_CTX_STEP) * AUTO_CTX_STEP


class _ContextLock:
    """One generation at a time on a llama.cpp context. A stream holds it across ``yield`` and
    may be finished or closed from another thread, so it is a plain lock, not an RLock; a thread
    that asks for it while one of its own streams holds it gets an error instead of a deadlock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> None:
        if self._owner == threading.get_ident():
            raise MdlEdgeError("this thread's unfinished stream holds the decoder: read it to the end or close() it first")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()


_LOG_CALLBACK = None  # keep the ctypes callback alive for the process lifetime
_BACKEND_LOCK = threading.Lock()
_BACKEND_READY = False


def init_backend() -> object:
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




def extra_bufts_safe() -> bool:
    """Whether ggml's extra CPU buffer types (weights repacked for the CPU's SIMD, and AMX tiles)
    are safe to use with this llama.cpp build.

    The AMX buffer type crashes in ``ggml_backend_amx_mul_mat`` on quantized weights whenever a
    batch has more than one token (llama.cpp issue #20824), and a native build on an AMX Xeon
    compiles it in; without AMX the extra types only repack weights.
    """
    info = init_backend().llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" not in info


class LlamaDecoder:
    """A GGUF decoder in one llama.cpp context: one generation at a time (concurrent callers wait
    for the context's lock).

    ``n_ctx``: context in positions; default automatic, starting at :data:`AUTO_CTX_STEP` and
    growing in such steps (up to the training length) when a request needs more, because the KV
    cache costs memory in proportion to it. ``threads``: default all available cores.
    ``f32_kv=True`` and flash attention off give logits equal to transformers' to ~1e-5 with an
    f32 GGUF (parity mode); the default f16 KV cache is faster and uses half the memory.
    ``flash_attn`` defaults to on, except in parity mode (``f32_kv=True``): measured on a 2-core
    AMX Xeon it raises prefill speed (Qwen3-0.6B Q4_K_M, 268 positions: 267 -> 344 positions/s)
    and changes logits by float round-off (``mdl-edge parity`` shows it).
    ``extra_bufts=True`` lets ggml repack weights for this CPU's SIMD kernels (Q4_K_M decoding
    1.3x faster on a 2-core AVX-512 EPYC; llama.cpp's own prompt pass slower) and reads the file
    instead of mapping it, so the repacked tensors are resident once. Off here; refused on builds
    with AMX (see :func:`extra_bufts_safe`); :class:`~mdl_edge.runtime.options.DecoderOptions`
    decides when a bundle's decoder uses it. ``one_batch=False`` evaluates a prompt's text and
    audio segments in separate calls (the way before text rows were fed as embeddings; kept to
    check that one batch gives the same logits). ``prefill``: a prompt engine
    (:class:`~mdl_edge.runtime.prefill.PrefillEngine`) that computes the prompt's keys and values
    (all positions but the last) for llama.cpp's cache; the decoder closes it with itself.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        n_batch: int = 512,
        f32_kv: bool = False,
        flash_attn: bool | None = None,
        extra_bufts: bool = False,
        one_batch: bool = True,
        prefill: PrefillEngine | None = None,
    ) -> None:
        self.path = Path(path)
        self._prefill = prefill
        if flash_attn is None:
            flash_attn = not f32_kv
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: not found")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < MIN_CTX):
            raise OptionError("n_ctx", f"n_ctx must be at least {MIN_CTX} positions, got {n_ctx!r}")
        whole_number("n_batch", n_batch)
        n_threads = resolve_threads(threads)
        header = read_gguf_header(self.path)
        self.meta = header.meta
        self.one_batch = one_batch
        self.flash_attn = bool(flash_attn)
        self.extra_bufts = bool(extra_bufts)
        self._token_embd = TokenEmbeddings(self.path, header)
        self.arch = str(self.meta.get(KEY_ARCHITECTURE))
        if self.arch not in ("qwen2", "qwen3"):
            raise CheckpointError(f"{self.path}: architecture {self.arch!r} is not a MiDashengLM decoder (qwen2 / qwen3)")
        if extra_bufts and not extra_bufts_safe():
            raise OptionError(
                "extra_bufts",
                "this llama.cpp build has AMX, whose buffer type crashes on quantized weights for batches of more "
                "than one token (llama.cpp issue #20824); rebuild with -DGGML_AMX_INT8=OFF or leave it off",
            )
        L = init_backend()
        self._L = L
        self._lock = _ContextLock()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if hasattr(mparams, "use_extra_bufts"):
            mparams.use_extra_bufts = extra_bufts
        if extra_bufts:
            # Read, not mapped: the mapped pages of the tensors ggml repacks would stay resident
            # beside their repacked copy (+0.2 GB for Qwen3-0.6B Q4_K_M), for nothing.
            if hasattr(mparams, "load_mode"):
                mparams.load_mode = L.LLAMA_LOAD_MODE_NONE
            elif hasattr(mparams, "use_mmap"):
                mparams.use_mmap = False
        self._model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise CheckpointError(f"{self.path}: llama.cpp could not load it (see the mdl_edge.llama_cpp log)")
        self._ctx = None
        self._batches: dict[tuple[int, bool], object] = {}
        try:
            cparams = L.llama_context_default_params()
            cparams.n_batch = n_batch
            cparams.n_ubatch = n_batch
            cparams.n_threads = cparams.n_threads_batch = n_threads
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
            self.threads = n_threads
            self.auto_ctx = n_ctx is None
            self._kv_dtype = np.dtype(np.float32) if f32_kv else KV_CACHE_DTYPE
            self._new_context(n_ctx or AUTO_CTX_STEP)
            if prefill is not None:
                self._check_prefill(prefill)
        except BaseException:
            self.close()
            raise

    def _new_context(self, n_ctx: int, n_seq: int = 1) -> None:
        """(Re)create the context: ``n_ctx`` KV cells shared by up to ``n_seq`` sequences (one
        unified cache, so a long request and short ones can share it)."""
        L = self._L
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        self._cparams.n_ctx = n_ctx
        self._cparams.n_seq_max = n_seq
        if hasattr(self._cparams, "kv_unified"):
            self._cparams.kv_unified = True
        self._ctx = L.llama_init_from_model(self._model, self._cparams)
        if not self._ctx:
            raise CheckpointError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = L.llama_n_ctx(self._ctx)
        self.n_seq = n_seq
        self._cached: list[Segment] = []  # what the KV cache holds, as segments
        self._n_past = 0

    @property
    def max_positions(self) -> int:
        """The most positions (prompt, new tokens and one) that one sequence may need: the
        training length with the automatic context size, else the context size."""
        return max(self.n_ctx_train, AUTO_CTX_STEP) if self.auto_ctx else self.n_ctx

    def _fit(self, need: int) -> None:
        """With the automatic context size, grow the context (whole steps, up to the training
        length) so that ``need`` positions fit; the KV cache starts empty after a resize."""
        if not self.auto_ctx or need <= self.n_ctx:
            return
        limit = self.max_positions
        if need > limit:
            raise ContextLengthError(f"this request needs {need} positions but the decoder was trained on {limit}; shorten the audio or max_new_tokens")
        size = min(context_steps(need), limit)
        logger.info("growing the decoder context from %d to %d positions", self.n_ctx, size)
        self._new_context(size, self.n_seq)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        L = self._L if hasattr(self, "_L") else None
        if L is None:
            return
        for b in self._batches.values():
            L.llama_batch_free(b)
        self._batches.clear()
        self._prefill = None  # its session goes with the last reference
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
    def _open(self) -> Any:
        # the vocabulary belongs to the model, which close() frees
        if not getattr(self, "_model", None):
            raise MdlEdgeError(f"{self.path}: the decoder is closed")
        return self._L

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special tokens parsed when ``special``)."""
        L = self._open()
        raw = text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self._vocab, raw, len(raw), buf, len(buf), False, special)
        if n < 0:
            buf = (L.llama_token * (-n))()
            n = L.llama_tokenize(self._vocab, raw, len(raw), buf, len(buf), False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as empty)."""
        L = self._open()
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
        with self._lock:
            return self._evaluate(segments)

    def _evaluate(self, segments: Sequence[Segment]) -> int:
        total = sum(len(s) for s in segments)
        if total == 0:
            raise ConfigError("empty prompt")
        if total >= self.n_ctx:
            raise ContextLengthError(f"the prompt has {total} positions but the context holds {self.n_ctx} (raise n_ctx)")
        keep, pos = 0, 0
        for old, new in zip(self._cached, segments):
            if same_segment(old, new):
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
        rest = list(segments[keep:])
        n_new = total - pos
        # kv_state.py writes one stream: a context of several sequences must share one cache
        one_stream = self.n_seq == 1 or hasattr(self._cparams, "kv_unified")
        if self._prefill is not None and self.one_batch and one_stream and n_new >= MIN_PREFILL_POSITIONS:
            try:
                self._prefill_rows(self._prefill, self.prompt_rows(rest), pos)
            except BaseException:
                self.clear()  # whatever the cache holds now, nothing may be reused from it
                raise
            self._cached.extend(rest)
            return n_new
        if self.one_batch and len(rest) > 1 and any(s.embeddings is not None for s in rest):
            batch = [Segment(embeddings=self._embeddings(rest))]  # text and audio in one batch
        else:
            batch = rest
        for i, seg in enumerate(batch):
            self._decode(seg, self._n_past, want_logits=i == len(batch) - 1)
            self._n_past += len(seg)
        self._cached.extend(rest)
        return n_new

    # -- the prompt engine ----------------------------------------------------------------
    @property
    def prefill(self) -> PrefillEngine | None:
        """The prompt engine, if one evaluates this decoder's prompts."""
        return self._prefill

    def _check_prefill(self, engine: PrefillEngine) -> None:
        """The engine must be this decoder's (checked on llama.cpp's own saved cells of a two-token
        prompt). A llama.cpp whose saved state is not the layout ``kv_state.py`` knows keeps its
        own prompt pass, with a warning."""
        self._decode(Segment(tokens=(0, 0)), 0, want_logits=False)
        try:
            saved = save_sequence(self._L, self._ctx)
        except MdlEdgeError as e:
            logger.warning("prompt engine off: %s", e)
            self._prefill = None
            return
        finally:
            self.clear()
        engine.check(self._L.llama_model_n_layer(self._model), self.n_embd, saved, self._kv_dtype, self.path.name)

    def _prefill_rows(self, engine: PrefillEngine, rows: np.ndarray, pos: int) -> None:
        """Rows at positions ``pos..``: all but the last through the prompt engine into the KV
        cache (after the ``pos`` positions it holds), the last through llama.cpp for its logits."""
        cells = rows[:-1]
        if pos == 0 and self.flash_attn and engine.kv_dtype == self._kv_dtype:
            # the usual case, a prompt from an empty cache: the engine writes each layer's keys
            # and values straight into the buffer llama.cpp reads, so they exist once, and a long
            # prompt's pieces read the earlier pieces' cells there
            blob = SequenceBlob(np.arange(cells.shape[0], dtype=np.int32), engine.n_layer, engine.kv_dim, self._kv_dtype, v_trans=False)
            engine.write_prompt(cells, [blob.k(i) for i in range(engine.n_layer)], [blob.v(i) for i in range(engine.n_layer)])
            restore_sequence(self._L, self._ctx, blob)
        else:
            past = save_sequence(self._L, self._ctx) if pos else None
            restore_sequence(self._L, self._ctx, engine.cells(cells, past, self._kv_dtype, v_trans=not self.flash_attn))
            del past
        release_freed_memory()  # the engine's run and the cells handed over
        self._decode(Segment(embeddings=rows[-1:]), pos + rows.shape[0] - 1, want_logits=True)
        self._n_past = pos + rows.shape[0]

    def _embeddings(self, segments: Sequence[Segment]) -> np.ndarray:
        """Segments as one ``[n, n_embd]`` float32 array: text tokens as their ``token_embd`` rows."""
        for s in segments:
            if s.embeddings is not None and s.embeddings.shape[1] != self.n_embd:
                raise ConfigError(f"audio embeddings are {s.embeddings.shape[1]}-d but {self.path.name} takes {self.n_embd}-d input")
        return np.concatenate([self._token_embd.rows(s.tokens) if s.embeddings is None else s.embeddings for s in segments])

    def reset(self) -> None:
        """Empty the KV cache (the next prompt is evaluated from scratch)."""
        with self._lock:
            self._L.llama_memory_seq_rm(self._L.llama_get_memory(self._ctx), 0, 0, -1)
            self._cached = []
            self._n_past = 0

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated position, ``[n_vocab]`` float32 (a copy)."""
        with self._lock:
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
        if opts.greedy:
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

    # -- the context for many sequences at once (runtime/batching.py) -----------------------
    def exclusive(self) -> _ContextLock:
        """The context for one caller at a time (``with dec.exclusive(): ...``); the methods below
        expect their caller to hold it."""
        return self._lock

    def clear(self) -> None:
        """Empty every sequence's KV cells."""
        self._L.llama_memory_clear(self._L.llama_get_memory(self._ctx), True)
        self._cached, self._n_past = [], 0

    def resize(self, n_ctx: int, n_seq: int) -> None:
        """A new, empty context of ``n_ctx`` cells shared by up to ``n_seq`` sequences."""
        self._new_context(n_ctx, n_seq)

    def prompt_rows(self, segments: Sequence[Segment]) -> np.ndarray:
        """A prompt as the ``[n, n_embd]`` rows it feeds the model (text tokens as their
        ``token_embd`` rows, audio as its embeddings)."""
        if any(s.embeddings is not None for s in segments):
            return self._embeddings(segments)
        return self.token_rows([t for s in segments for t in s.tokens])

    def token_rows(self, tokens: Sequence[int]) -> np.ndarray:
        """The ``token_embd`` rows of ``tokens``, ``[len(tokens), n_embd]`` float32."""
        return self._token_embd.rows(list(tokens))

    def decode_rows(self, rows: np.ndarray, positions: Sequence[int], seq_ids: Sequence[int], want_logits: Sequence[bool]) -> None:
        """One ``llama_decode`` of ``rows`` (``[n, n_embd]``, n <= ``n_batch``), row ``i`` at
        position ``positions[i]`` of sequence ``seq_ids[i]``; logits kept where ``want_logits``."""
        n = rows.shape[0]
        b = self._batch(True)
        for i in range(n):
            b.pos[i] = positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_ids[i]
            b.logits[i] = bool(want_logits[i])
        b.n_tokens = n
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
        rc = self._L.llama_decode(self._ctx, b)
        if rc != 0:
            raise MdlEdgeError(f"llama_decode failed (code {rc}) on a batch of {n} rows")

    def new_sampler(self, sampling: SamplingOptions) -> object:
        """A llama.cpp sampler chain for ``sampling``; give it back with :meth:`free_sampler`."""
        return self._sampler(sampling)

    def free_sampler(self, sampler: object) -> None:
        self._L.llama_sampler_free(sampler)

    def sample(self, sampler: object, row: int) -> int:
        """The next token from the logits of batch row ``row`` of the last decode."""
        return int(self._L.llama_sampler_sample(sampler, self._ctx, row))

    def copy_cells(self, src: int, dst: int, n: int) -> None:
        """Copy sequence ``src``'s KV cells of positions ``[0, n)`` to sequence ``dst``."""
        self._L.llama_memory_seq_cp(self._L.llama_get_memory(self._ctx), src, dst, 0, n)

    def drop_sequence(self, seq: int) -> None:
        """Free every KV cell of sequence ``seq``."""
        self._L.llama_memory_seq_rm(self._L.llama_get_memory(self._ctx), seq, -1, -1)

    # -- generation -----------------------------------------------------------------------
    def generate(
        self,
        segments: Sequence[Segment],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        sampling: SamplingOptions = SamplingOptions(),
    ) -> "Stream[DecodeResult]":
        """Evaluate the prompt (reusing the cached prefix), then generate until a stop id or
        stop string (neither is part of the answer) or ``max_new_tokens``. The stream yields
        text as soon as it is final (a character split across tokens waits for its last byte,
        text that may begin a stop string for the next token); its result holds the token ids,
        the stop reason and the timings. Nothing runs until it is read."""
        whole_number("max_new_tokens", max_new_tokens)
        return Stream(self._generate(list(segments), max_new_tokens, tuple(stop_ids), tuple(stop_strings), sampling))

    def _generate(self, segments: list[Segment], max_new_tokens: int, stop_ids: tuple[int, ...],
                  stop_strings: tuple[str, ...], sampling: SamplingOptions) -> Generator[str, None, "DecodeResult"]:
        n_prompt = sum(len(s) for s in segments)
        with self._lock:
            self._fit(n_prompt + max_new_tokens + 1)
            t0 = time.perf_counter()
            evaluated = self._evaluate(segments)
            t1 = time.perf_counter()
            step = SequenceStep(self, sampling, stop_ids, stop_strings, max_new_tokens)
            try:
                yield from self._sample(step)
            finally:
                step.close()
            t2 = time.perf_counter()
        return DecodeResult("".join(step.text), tuple(step.tokens), step.reason or "max_new_tokens", n_prompt, evaluated, t1 - t0, t2 - t1)

    def _sample(self, step: SequenceStep) -> Generator[str, None, None]:
        """Sample from the last evaluated position on (the caller holds the lock), yielding the
        text pieces; each token is appended to the KV cache as it is generated."""
        for _ in range(step.max_new_tokens):
            tok = self.sample(step.sampler, -1)
            yield from step.take(tok)
            if step.reason is not None:
                return  # the answer is complete: its last token needs no pass of its own
            if self._n_past + 1 >= self.n_ctx:
                raise ContextLengthError(f"generation reached the context size ({self.n_ctx}); raise n_ctx")
            seg = Segment(tokens=(tok,))
            self._decode(seg, self._n_past, want_logits=True)
            self._n_past += 1
            self._cached.append(seg)


@dataclass(frozen=True)
class DecodeResult:
    """One generation: text, token ids, why it stopped, prompt size and timings (seconds)."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str  # "stop_token", "stop_string" or "max_new_tokens"
    n_prompt: int
    n_evaluated: int  # prompt positions actually evaluated (the rest came from the KV cache)
    prefill_s: float
    decode_s: float
