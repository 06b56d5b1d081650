"""What a caller can choose, as frozen dataclasses validated where they are built, and the one
place that turns "threads: default" into a number (torch-free).

Load-time options (``EncoderOptions``, ``DecoderOptions``) are taken by
:class:`~mdl_edge.runtime.pipeline.AudioLM` and built the same way by the command line, the
server and the cluster path; ``GenerationOptions`` travels from the command line (built once per
run) or a Python caller, typed, through ``AudioLM`` to the decoder. Per-call callbacks (streamed
text, encoder progress) are arguments of the call, not options.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .errors import OptionError

#: Product decision 4: at most this many new tokens unless the caller says otherwise.
DEFAULT_MAX_NEW_TOKENS = 256
#: The smallest decoder context accepted (llama.cpp itself rounds small sizes up to 256).
MIN_CTX = 64
PROVIDERS = ("cpu", "cuda")


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def whole_number(option: str, value: object, minimum: int = 1, *, hint: str = "") -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else an :class:`OptionError`
    naming ``option`` (every count option of the runtime is checked here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(option, f"must be a whole number >= {minimum}{hint}, got {value!r}")
    return value


def resolve_threads(threads: int | None) -> int:
    """``None`` -> every available core; otherwise a count of at least 1. Every thread pool of
    the runtime (C++ log-mel, ONNX Runtime, llama.cpp, the quantizer) is sized through here."""
    if threads is None:
        return available_cores()
    return whole_number("threads", threads, hint=" (or unset for all cores)")


def default_parallel() -> int:
    """Sequences decoded together by default: twice the cores, at most 8, and at most 2 on a
    machine with under 8 GB of memory (each sequence costs its KV cells: Qwen3-0.6B, f16 cache,
    0.06 GB per 512 positions; Qwen2-7B 0.03 GB). Measured on 2 cores (``mdl-edge bench
    --parallel``): 4 sequences decode Q4_K_M at 1.7-2.4x the single-sequence rate for +0.19 GB."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = 0
    n = min(8, 2 * available_cores())
    return min(n, 2) if 0 < memory < 8 * 2**30 else n


def _number(name: str, value: object, ok: bool, want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise OptionError(name, f"invalid sampling option {name}={value!r} (must be {want})")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """How the next token is chosen. Greedy unless ``temperature > 0``; ``seed`` makes sampling
    repeatable. The chain is llama.cpp's: repetition penalty, top-k, top-p, min-p, temperature."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _number("temperature", self.temperature, self.temperature >= 0, ">= 0; 0 is greedy")
        _number("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "a whole number >= 0; 0 is off")
        _number("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _number("min_p", self.min_p, 0 <= self.min_p < 1, "in [0, 1)")
        _number("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0; 1 is off")
        _number("seed", self.seed, isinstance(self.seed, int), "a whole number")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """One request's decoding options.

    ``max_new_tokens``: new-token limit (>= 1). ``sampling``: see :class:`SamplingOptions`.
    ``stop_ids``: token ids that end the answer besides the model's own (``<|im_end|>``,
    ``<|endoftext|>``, the checkpoint's eos ids). ``stop``: strings that end the answer (it ends
    before the first one that appears). ``ignore_eos``: generate exactly
    ``max_new_tokens`` (benchmarks). ``audio_first``: the default user turn is ``[audio, text]``
    instead of ``[text, audio]`` (then several questions about one clip share the decoder's
    evaluated audio prefix).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    audio_first: bool = False

    def __post_init__(self) -> None:
        whole_number("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.sampling, SamplingOptions):
            raise OptionError("sampling", f"must be a SamplingOptions, got {type(self.sampling).__name__}")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_ids):
            raise OptionError("stop_ids", f"must be token ids (whole numbers >= 0), got {self.stop_ids!r}")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise OptionError("stop", f"must be a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))


def _flag(name: str, value: object, *, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise OptionError(name, f"must be true or false{' (or unset)' if optional else ''}, got {value!r}")


def _variant(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise OptionError(name, f"must be a variant name of the bundle, got {value!r}")


PREFILL_CHOICES = ("auto", "onnx", "llama")


@dataclass(frozen=True, kw_only=True)
class EncoderOptions:
    """How the audio encoder is loaded. ``variant``: a name from the bundle's manifest (default:
    its default); ``provider``: ``"cpu"`` or ``"cuda"`` (ONNX Runtime); ``max_batch``: chunks per
    ONNX run (default 1 on the CPU, 8 on CUDA); ``static_frames``: pad every partial chunk to
    1008 frames (static-shape backends); ``precise_int8``: ONNX Runtime's exact u8 x u8 int8
    kernels (default: on exactly where the u8 x s8 ones can saturate). See
    :class:`~mdl_edge.runtime.encoder.AudioEncoder`."""

    variant: str | None = None
    provider: str = "cpu"
    max_batch: int | None = None
    static_frames: bool = False
    precise_int8: bool | None = None

    def __post_init__(self) -> None:
        _variant("encoder", self.variant)
        if self.provider not in PROVIDERS:
            raise OptionError("provider", f"must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.max_batch is not None:
            whole_number("max_batch", self.max_batch)
        _flag("static_frames", self.static_frames)
        _flag("precise_int8", self.precise_int8, optional=True)


@dataclass(frozen=True, kw_only=True)
class DecoderOptions:
    """How the llama.cpp decoder is loaded. ``variant``: a name from the bundle's manifest;
    ``n_ctx``: context in positions (default: automatic, sized to each request); ``n_batch``:
    prompt positions per llama.cpp batch; ``f32_kv``: f32 KV cache (parity); ``flash_attn``:
    default on, off in parity mode (``f32_kv``); ``extra_bufts``: llama.cpp's weights repacked
    for this CPU (unset: on where the build repacks safely and the prompt engine evaluates prompts,
    since repacking speeds decoding but slows llama.cpp's own prompt pass);
    ``one_batch``: the whole prompt in one batch; ``prefill``: who evaluates the prompt,
    ``"auto"`` (the bundle's prompt engine for a quantized decoder outside parity mode, else
    llama.cpp), ``"onnx"`` (the prompt engine, an error if the bundle has none) or ``"llama"``
    (llama.cpp). See :class:`~mdl_edge.runtime.decoder.LlamaDecoder`."""

    variant: str | None = None
    n_ctx: int | None = None
    n_batch: int = 512
    f32_kv: bool = False
    flash_attn: bool | None = None
    extra_bufts: bool | None = None
    one_batch: bool = True
    prefill: str = "auto"

    def __post_init__(self) -> None:
        _variant("decoder", self.variant)
        if self.prefill not in PREFILL_CHOICES:
            raise OptionError("prefill", f"must be one of {', '.join(PREFILL_CHOICES)}, got {self.prefill!r}")
        if self.n_ctx is not None:
            whole_number("n_ctx", self.n_ctx, MIN_CTX, hint=" positions")
        whole_number("n_batch", self.n_batch)
        _flag("f32_kv", self.f32_kv)
        _flag("flash_attn", self.flash_attn, optional=True)
        _flag("extra_bufts", self.extra_bufts, optional=True)
        _flag("one_batch", self.one_batch)


def encoder_options(value: "str | EncoderOptions | None") -> EncoderOptions:
    """A variant name (or nothing) as :class:`EncoderOptions`; options as they are."""
    return value if isinstance(value, EncoderOptions) else EncoderOptions(variant=value)


def decoder_options(value: "str | DecoderOptions | None") -> DecoderOptions:
    """A variant name (or nothing) as :class:`DecoderOptions`; options as they are."""
    return value if isinstance(value, DecoderOptions) else DecoderOptions(variant=value)
