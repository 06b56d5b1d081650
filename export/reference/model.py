"""The full-precision PyTorch MiDashengLM: the parity reference for every fast path.

Front end -> Dasheng encoder -> projector on the stitched 25 Hz sequence -> placeholder merge ->
transformers' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` built from the ``decoder.*`` tensors ->
greedy decoding until ``<|im_end|>`` / ``<|endoftext|>``. fp32 on CPU or CUDA (same code).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...runtime import constants as C
from ...runtime.config import DecoderConfig, ModelConfig
from ...runtime.errors import CheckpointError, ConfigError
from ...runtime.prompt import PromptFormat, user_message
from ..convert.checkpoint import Checkpoint
from ..convert.layout import DECODER_PREFIX, ENCODER_PREFIX, PROJECTOR_PREFIX, front_end_buffer_names
from .encoder import AudioProjector, DashengEncoder, DashengTokenizerEncoder, build_audio_encoder
from .mel import LogMel, batch_log_mel

logger = logging.getLogger("mdl_edge")


AudioEncoderModule = DashengEncoder | DashengTokenizerEncoder


def load_audio_tower(ckpt: Checkpoint, encoder: AudioEncoderModule | None = None,
                     projector: AudioProjector | None = None) -> tuple[AudioEncoderModule, AudioProjector]:
    """The encoder (of the checkpoint's variant) and projector in fp32 (the decoder is not read)."""
    cfg = ckpt.config
    encoder = encoder or build_audio_encoder(cfg.encoder)
    projector = projector or AudioProjector(cfg.encoder.embed_dim, cfg.decoder.hidden_size, cfg.subsample_factor)
    buffers = front_end_buffer_names(cfg)
    state = {k: v for k, v in ckpt.load(ENCODER_PREFIX, dtype=torch.float32) if ENCODER_PREFIX + k not in buffers}
    encoder.load_state_dict(state, strict=True)
    projector.load_state_dict(dict(ckpt.load(PROJECTOR_PREFIX, dtype=torch.float32)), strict=True)
    return encoder.eval(), projector.eval()


def transformers_decoder_config(dec: DecoderConfig) -> Any:
    """A transformers Qwen2Config / Qwen3Config equivalent to ``text_config``.

    Qwen2.5-Omni text configs carry an ``mrope_section``; with the three position streams equal
    (audio + text input) M-RoPE is plain 1-D RoPE, so it is dropped as vLLM and SGLang do.
    """
    from transformers import Qwen2Config, Qwen3Config

    act = dec.raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"text_config.hidden_act {act!r} is not supported (Qwen decoders use 'silu')")
    common = dict(
        hidden_size=dec.hidden_size,
        num_hidden_layers=dec.num_layers,
        num_attention_heads=dec.num_heads,
        num_key_value_heads=dec.num_kv_heads,
        head_dim=dec.head_dim,
        intermediate_size=dec.intermediate_size,
        vocab_size=dec.vocab_size,
        rms_norm_eps=dec.rms_norm_eps,
        rope_theta=dec.rope_theta,
        tie_word_embeddings=dec.tie_word_embeddings,
        max_position_embeddings=dec.max_position_embeddings,
        hidden_act="silu",
        use_sliding_window=False,
    )
    if dec.arch == "qwen3":
        return Qwen3Config(attention_bias=dec.attention_bias, **common)
    return Qwen2Config(**common)


def build_decoder(dec: DecoderConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """Instantiate the transformers causal LM without allocating random weights, then assign ``state``."""
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    config = transformers_decoder_config(dec)
    config._attn_implementation = "sdpa"
    cls = Qwen3ForCausalLM if dec.arch == "qwen3" else Qwen2ForCausalLM
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if dec.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise CheckpointError(f"decoder tensors do not fit {cls.__name__}: missing {sorted(set(missing) - allowed_missing)}, unexpected {unexpected}")
    if dec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def cache_keyword(decoder: nn.Module) -> str:
    """The keyword this transformers version takes the KV cache by (renamed during 5.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class ReferenceResult:
    """Output of one reference generation."""

    text: str
    token_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    n_audio_tokens: int
    stop_reason: str  # "stop_token" or "max_new_tokens"
    timings: dict[str, float] = field(default_factory=dict)


class MiDashengLM(nn.Module):
    """The whole model; submodule names equal the checkpoint prefixes (``audio_encoder`` ...)."""

    def __init__(self, cfg: ModelConfig, decoder: nn.Module, prompt: PromptFormat | None = None, *, bf16_buffers: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.front_end = LogMel(acoustic_mels=int(cfg.encoder.acoustic_mels or 0), bf16_buffers=bf16_buffers)
        self.audio_encoder = build_audio_encoder(cfg.encoder)
        self.audio_projector = AudioProjector(cfg.encoder.embed_dim, cfg.decoder.hidden_size, cfg.subsample_factor)
        self.decoder = decoder
        self.prompt = prompt

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, device: str = "cpu", bf16_buffers: bool = False) -> "MiDashengLM":
        """Load an official-layout checkpoint folder in fp32 (validated by name and shape first)."""
        t0 = time.perf_counter()
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} requested but CUDA is not available")
            # The reference is full precision: TF32 matmuls/convolutions (cuDNN's default) would
            # put ~1e-3 relative error into every layer. This is process-wide, as torch's flags are.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        ckpt = Checkpoint(model_dir)
        prompt = PromptFormat.from_dir(model_dir)
        vocab = prompt.tokenizer.get_vocab_size()
        if vocab > ckpt.config.decoder.vocab_size:
            raise CheckpointError(f"{model_dir}: tokenizer has {vocab} tokens but the decoder only {ckpt.config.decoder.vocab_size} rows")
        if prompt.special.audio != ckpt.config.audio_token_id:
            raise CheckpointError(
                f"{model_dir}: config.json audio_token_id {ckpt.config.audio_token_id} is not the tokenizer's <|AUDIO|> id {prompt.special.audio}"
            )
        dec_state = dict(ckpt.load(DECODER_PREFIX, dtype=torch.float32))
        model = cls(ckpt.config, build_decoder(ckpt.config.decoder, dec_state), prompt, bf16_buffers=bf16_buffers)
        del dec_state
        load_audio_tower(ckpt, model.audio_encoder, model.audio_projector)
        model = model.to(device).eval()
        logger.info("loaded reference model from %s in %.1f s", model_dir, time.perf_counter() - t0)
        return model

    @property
    def device(self) -> torch.device:
        return self.audio_projector.net[0].weight.device

    @torch.inference_mode()
    def log_mel(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of clips -> ``(log-mel [B, 64, T], lengths [B])`` (lengths after 3200-sample padding)."""
        return batch_log_mel(self.front_end, waves, self.device)

    @torch.inference_mode()
    def encode_audio(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each clip -> its audio embeddings ``[N_i, hidden]``, ``N_i = ((1 + L//160)//4)//5``."""
        mel, lengths = self.log_mel(waves)
        feats = self.audio_encoder(mel, lengths)
        return self.project(feats, lengths)

    def project(self, feats: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Padded 25 Hz features ``[B, P, D]`` of clips of ``lengths`` samples -> each clip's audio
        embeddings ``[N_i, hidden]``."""
        proj = self.audio_projector(feats)
        return [proj[i, : C.n_audio_tokens(int(n))] for i, n in enumerate(lengths)]

    def embed_prompt(self, ids: Sequence[int], audio_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the ``<|AUDIO|>`` rows replaced, in order, by the audio embeddings."""
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        emb = self.decoder.get_input_embeddings()(ids_t)
        audio = torch.cat(list(audio_embeds)) if audio_embeds else emb[:0]
        slots = ids_t == self.cfg.audio_token_id
        if int(slots.sum()) != audio.shape[0]:
            raise ValueError(f"prompt has {int(slots.sum())} audio placeholders but {audio.shape[0]} audio embeddings were given")
        emb[slots] = audio.to(emb.dtype)
        return emb

    @torch.inference_mode()
    def generate_from_embeds(
        self, embeds: torch.Tensor, *, max_new_tokens: int = 256, stop_ids: Sequence[int] = ()
    ) -> tuple[list[int], str, dict[str, float]]:
        """Greedy decoding from prompt embeddings ``[n, hidden]`` with a KV cache.

        Returns ``(new token ids without the stop token, stop reason, timings)``.
        """
        stop = set(stop_ids)
        t0 = time.perf_counter()
        out = self.decoder(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        cache_kw = cache_keyword(self.decoder)
        tokens: list[int] = []
        reason = "max_new_tokens"
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stop:
                reason = "stop_token"
                break
            tokens.append(nxt)
            if len(tokens) == max_new_tokens:
                break
            out = self.decoder(
                input_ids=torch.tensor([[nxt]], device=self.device), use_cache=True, logits_to_keep=1, **{cache_kw: getattr(out, cache_kw)}
            )
        return tokens, reason, {"prefill": t_prefill, "decode": time.perf_counter() - t1}

    def generate(
        self,
        wave: np.ndarray,
        text: str,
        *,
        max_new_tokens: int = 256,
        audio_first: bool = False,
        messages: list[dict[str, Any]] | None = None,
    ) -> ReferenceResult:
        """Answer ``text`` about one 16 kHz mono clip (default message: user ``[text, audio]``)."""
        if self.prompt is None:
            raise ValueError("this model was built without a tokenizer / chat template")
        timings: dict[str, float] = {}
        t = time.perf_counter()
        mel, lengths = self.log_mel([wave])
        timings["mel"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            feats = self.audio_encoder(mel, lengths)
        timings["encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            (audio,) = self.project(feats, lengths)
        timings["projector"] = time.perf_counter() - t
        ids = self.prompt.encode(messages or user_message(text, audio_first=audio_first), [audio.shape[0]])
        with torch.inference_mode():
            embeds = self.embed_prompt(ids, [audio])
        tokens, reason, gen_t = self.generate_from_embeds(embeds, max_new_tokens=max_new_tokens, stop_ids=self.prompt.stop_ids)
        timings.update(gen_t)
        return ReferenceResult(self.prompt.decode(tokens), tuple(tokens), tuple(ids), int(audio.shape[0]), reason, timings)
