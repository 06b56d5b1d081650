"""Parse and validate an official MiDashengLM ``config.json`` (torch-free).

The official layout: top-level ``architectures: ["MiDashengLMModel"]``, ``audio_encoder_config``
(Dasheng fields), ``subsample_factor``, ``text_config`` (a Qwen2/Qwen2.5-Omni or Qwen3 text
config) and ``audio_token_id`` (spec §4.5). Every value is type-checked so that a bad file fails
here with the key named, not deep inside a model constructor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import constants as C
from .errors import CheckpointError, ConfigError

_MISSING = object()

#: text_config.model_type values we know, mapped to the decoder architecture they denote.
DECODER_ARCHS: dict[str, Literal["qwen2", "qwen3"]] = {
    "qwen2": "qwen2",
    "qwen2_5_omni_text": "qwen2",  # the 7B decoder is the Qwen2.5-Omni thinker LM = Qwen2 arch
    "qwen2_5_omni_thinker": "qwen2",
    "qwen3": "qwen3",
}


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING) -> Any:
    if key not in d or d[key] is None:
        if default is _MISSING:
            raise ConfigError(f"{where}: required key {key!r} is missing")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; a boolean where a number belongs is a broken file, not a 0/1.
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: key {key!r} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _pair(d: dict[str, Any], key: str, where: str, default: tuple[int, int]) -> tuple[int, int]:
    value = _get(d, key, (list, int), where, list(default))
    if isinstance(value, int):
        value = [value, value]
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: key {key!r} must be an int or a pair of ints, got {value!r}")
    return (value[0], value[1])


#: ``audio_encoder_config.model_type`` values that denote a DashengTokenizer-style encoder.
TOKENIZER_MODEL_TYPES = frozenset({"dashengtokenizer", "dasheng_tokenizer", "midashenglm_dasheng_tokenizer"})
#: the largest acoustic mel the C++ front end computes (the public tokenizers use 100 or 128)
MAX_ACOUSTIC_MELS = 512


@dataclass(frozen=True)
class EncoderConfig:
    """Audio encoder hyper-parameters (``audio_encoder_config``).

    ``acoustic_mels`` tells the variant: 0 is the plain Dasheng encoder (the 7B's); ``n > 0`` a
    DashengTokenizer-style encoder whose acoustic branch reads an ``n``-bin mel (spec §6.4,
    MiDashengLM-0.6B); ``None`` the latter with the bin count not stated in the config (a
    checkpoint reads it from its acoustic patch embedding).
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    patch_size: tuple[int, int]
    patch_stride: tuple[int, int]
    n_mels: int
    target_length: int
    acoustic_mels: int | None = 0

    @property
    def variant(self) -> Literal["dasheng", "dasheng_tokenizer"]:
        """``"dasheng"`` (semantic ViT only) or ``"dasheng_tokenizer"`` (plus the acoustic branch)."""
        return "dasheng" if self.acoustic_mels == 0 else "dasheng_tokenizer"

    def with_acoustic_mels(self, n: int) -> "EncoderConfig":
        """This configuration as a DashengTokenizer-style encoder with an ``n``-bin acoustic mel."""
        if not 1 <= n <= MAX_ACOUSTIC_MELS:
            raise ConfigError(f"acoustic mel bins must be in [1, {MAX_ACOUSTIC_MELS}], got {n}")
        return dataclasses.replace(self, acoustic_mels=n)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def n_time_patches(self) -> int:
        return self.target_length // self.patch_stride[1]


@dataclass(frozen=True)
class DecoderConfig:
    """Qwen decoder hyper-parameters (``text_config``); ``raw`` is handed to transformers as-is."""

    arch: Literal["qwen2", "qwen3"]
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)


@dataclass(frozen=True)
class ModelConfig:
    """A whole MiDashengLM checkpoint configuration."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    subsample_factor: int
    audio_token_id: int
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def projector_in(self) -> int:
        return self.encoder.embed_dim * self.subsample_factor

    def with_encoder(self, encoder: EncoderConfig) -> "ModelConfig":
        """The same configuration with another encoder (e.g. the variant a checkpoint's tensors show)."""
        return dataclasses.replace(self, encoder=encoder)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read ``model_dir/config.json``."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (is {model_dir} a MiDashengLM checkpoint folder?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not readable as JSON: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "ModelConfig":
        """Validate a parsed config.json; errors name ``source`` and the offending key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a JSON object")
        archs = _get(data, "architectures", list, source, ["MiDashengLMModel"])
        if "MiDashengLMModel" not in archs:
            raise ConfigError(f"{source}: architectures {archs!r} do not include 'MiDashengLMModel'")
        enc = _parse_encoder(_get(data, "audio_encoder_config", dict, source), f"{source}: audio_encoder_config")
        dec = _parse_decoder(_get(data, "text_config", dict, source), f"{source}: text_config")
        k = _get(data, "subsample_factor", int, source, C.SUBSAMPLE)
        if k != C.SUBSAMPLE:
            raise ConfigError(f"{source}: subsample_factor {k} is not supported (MiDashengLM uses {C.SUBSAMPLE})")
        audio_token_id = _get(data, "audio_token_id", int, source)
        if not 0 <= audio_token_id < dec.vocab_size:
            raise ConfigError(
                f"{source}: audio_token_id {audio_token_id} is outside the decoder vocabulary (size {dec.vocab_size})"
            )
        return cls(encoder=enc, decoder=dec, subsample_factor=k, audio_token_id=audio_token_id, raw=data)


def _parse_encoder(d: dict[str, Any], where: str) -> EncoderConfig:
    # DashengTokenizer-style encoders: named by model_type or by their acoustic bin count.
    n_ac = _get(d, "n_mels_patch", int, where, None)
    tokenizer = n_ac is not None or _get(d, "model_type", str, where, "") in TOKENIZER_MODEL_TYPES
    if n_ac is not None and not 1 <= n_ac <= MAX_ACOUSTIC_MELS:
        raise ConfigError(f"{where}: n_mels_patch must be in [1, {MAX_ACOUSTIC_MELS}], got {n_ac}")
    enc = EncoderConfig(
        embed_dim=_get(d, "embed_dim", int, where),
        depth=_get(d, "depth", int, where),
        num_heads=_get(d, "num_heads", int, where, 16),
        mlp_ratio=float(_get(d, "mlp_ratio", float, where, 4.0)),
        qkv_bias=_get(d, "qkv_bias", bool, where, True),
        patch_size=_pair(d, "patch_size", where, (C.N_MELS, C.PATCH_FRAMES)),
        patch_stride=_pair(d, "patch_stride", where, (C.N_MELS, C.PATCH_FRAMES)),
        n_mels=_get(d, "n_mels", int, where, C.N_MELS),
        target_length=_get(d, "target_length", int, where, C.CHUNK_FRAMES),
        acoustic_mels=n_ac if tokenizer else 0,
    )
    for key, value in (("embed_dim", enc.embed_dim), ("depth", enc.depth), ("num_heads", enc.num_heads)):
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {value}")
    if enc.embed_dim % enc.num_heads:
        raise ConfigError(f"{where}: embed_dim {enc.embed_dim} is not divisible by num_heads {enc.num_heads}")
    if _get(d, "init_values", float, where, None) is not None:
        raise ConfigError(f"{where}: init_values (LayerScale) is not used by MiDashengLM and not supported")
    # The front end and chunking are fixed by the model family; refuse anything else loudly.
    fixed = {
        "n_mels": (enc.n_mels, C.N_MELS),
        "patch_size": (enc.patch_size, (C.N_MELS, C.PATCH_FRAMES)),
        "patch_stride": (enc.patch_stride, (C.N_MELS, C.PATCH_FRAMES)),
        "target_length": (enc.target_length, C.CHUNK_FRAMES),
        "n_fft": (_get(d, "n_fft", int, where, C.N_FFT), C.N_FFT),
        "win_length": (_get(d, "win_length", int, where, C.WIN_LENGTH), C.WIN_LENGTH),
        "hop_length": (_get(d, "hop_length", int, where, C.HOP_LENGTH), C.HOP_LENGTH),
        "sample_rate": (_get(d, "sample_rate", int, where, C.SAMPLE_RATE), C.SAMPLE_RATE),
        "f_min": (float(_get(d, "f_min", float, where, C.F_MIN)), C.F_MIN),
        "f_max": (float(_get(d, "f_max", float, where, C.F_MAX)), C.F_MAX),
        "center": (_get(d, "center", bool, where, True), True),
        "input_channels": (_get(d, "input_channels", int, where, 1), 1),
    }
    for key, (got, want) in fixed.items():
        if got != want:
            raise ConfigError(f"{where}: {key} = {got!r} is not supported (MiDashengLM uses {want!r})")
    return enc


def _parse_decoder(d: dict[str, Any], where: str) -> DecoderConfig:
    model_type = _get(d, "model_type", str, where)
    if model_type not in DECODER_ARCHS:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported (known: {sorted(DECODER_ARCHS)})")
    arch = DECODER_ARCHS[model_type]
    hidden = _get(d, "hidden_size", int, where)
    heads = _get(d, "num_attention_heads", int, where)
    rope = d.get("rope_parameters")
    rope_theta = _get(d, "rope_theta", float, where, None)
    if rope_theta is None and isinstance(rope, dict):
        rope_theta = _get(rope, "rope_theta", float, f"{where}.rope_parameters", None)
    dec = DecoderConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=_get(d, "num_hidden_layers", int, where),
        num_heads=heads,
        num_kv_heads=_get(d, "num_key_value_heads", int, where, heads),
        head_dim=_get(d, "head_dim", int, where, hidden // heads if heads else 0),
        intermediate_size=_get(d, "intermediate_size", int, where),
        vocab_size=_get(d, "vocab_size", int, where),
        rms_norm_eps=float(_get(d, "rms_norm_eps", float, where, 1e-6)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),  # transformers' default
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, where, arch == "qwen3"),
        # Qwen2 always has q/k/v biases (its transformers class ignores the key); Qwen3 reads it.
        attention_bias=True if arch == "qwen2" else _get(d, "attention_bias", bool, where, False),
        max_position_embeddings=_get(d, "max_position_embeddings", int, where, 32768),
        raw=d,
    )
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size"):
        if getattr(dec, key) <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {getattr(dec, key)}")
    if dec.num_heads % dec.num_kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {dec.num_kv_heads}")
    return dec
