"""Model bundles: a folder holding everything the runtime needs, described by ``manifest.json``
(schema: ``runtime/manifest.py``), written by ``mdl-edge export`` (``export/convert/bundle.py``).

Every check that the pieces belong together lives here: the manifest against the tokenizer and
chat template when the bundle is opened, each encoder and decoder file against the manifest
when it is loaded (source checkpoint hash, widths, special-token ids), before anything runs.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import gguf_meta as G
from .errors import CheckpointError, ConfigError, OptionError
from .manifest import MANIFEST, Manifest, check_file_name
from .prompt import PromptFormat
from .options import DecoderOptions, EncoderOptions

if TYPE_CHECKING:
    from .decoder import LlamaDecoder
    from .encoder import AudioEncoder
    from .prefill import PrefillEngine


def engine_by_default(options: DecoderOptions, decoder_meta: dict[str, object]) -> bool:
    """Whether ``prefill="auto"`` evaluates prompts with the int8 prompt engine: for a quantized
    decoder (its GGUF metadata ``decoder_meta``) outside parity mode (``f32_kv``) and with
    ``one_batch``, on a CPU with int8 dot products (:attr:`~mdl_edge.runtime.cpu.CpuInfo.fast_int8`;
    without them ONNX Runtime's int8 is no faster than its fp32). A full-precision decoder, chosen
    for fidelity, keeps llama.cpp's own prompt pass."""
    from .cpu import cpu_info

    file_type = decoder_meta.get(G.KEY_FILE_TYPE)
    quantized = G.FILE_TYPES.get(file_type if isinstance(file_type, int) else -1, "") not in (*G.FULL_PRECISION_TYPES, "")
    return quantized and not options.f32_kv and options.one_batch and cpu_info().fast_int8


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle folder: its manifest and its prompt format."""

    dir: Path
    manifest: Manifest
    prompt: PromptFormat

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        """Read the manifest, tokenizer and chat template and check that they agree."""
        d = Path(path)
        if not d.is_dir():
            raise ConfigError(f"{d}: not a folder (expected a bundle made by `mdl-edge export`)")
        m = d / MANIFEST
        if not m.is_file():
            hint = " (it looks like a Hugging Face checkpoint: run `mdl-edge export` on it first)" if (d / "config.json").is_file() else ""
            raise CheckpointError(f"{d}: no {MANIFEST}; not an mdl-edge bundle{hint}")
        manifest = Manifest.read(m)
        prompt = PromptFormat.from_dir(d)
        prompt.check()
        t, s = manifest.tokens, prompt.special
        theirs = {"audio": s.audio, "audio_bos": s.audio_bos, "audio_eos": s.audio_eos, "im_end": s.im_end, "end_of_text": s.end_of_text}
        for key, tok_id in theirs.items():
            if getattr(t, key) != tok_id:
                raise CheckpointError(f"{m}: field 'tokens.{key}' is {getattr(t, key)} but the bundle's tokenizer.json has {tok_id}")
        return cls(d, manifest, prompt)

    def file(self, name: str) -> Path:
        """A file of the bundle, named relative to its folder. The name must stay inside the
        folder; the file itself may be a symlink to anywhere (the Hugging Face cache keeps a
        bundle's files in ``../../blobs/``)."""
        p = self.dir / check_file_name(name, f"{self.dir / MANIFEST}: a file name")
        if not p.is_file():
            raise CheckpointError(f"{self.dir}: {name} is listed in the manifest but missing")
        return p

    def variant(self, part: str, name: str | None) -> tuple[str, Path]:
        """The chosen (default: the manifest's default) variant of ``encoder``/``decoder`` and its file."""
        section = self.manifest.part(part)
        name = name or section.default
        if name not in section.variants:
            raise OptionError(part, f"{self.dir}: no {part} variant {name!r}; this bundle has {', '.join(section.variants)}")
        return name, self.file(section.variants[name].file)

    # -- loading checked pieces --------------------------------------------------------------
    def load_encoder(self, options: EncoderOptions = EncoderOptions(), *, threads: int | None = None) -> tuple[str, "AudioEncoder"]:
        """The encoder variant ``options`` name (default: the manifest's) with the bundle's
        projector, checked against the manifest."""
        from .encoder import AudioEncoder

        name, path = self.variant("encoder", options.variant)
        m = self.manifest
        self.file(m.projector.file)
        enc = AudioEncoder(self.dir, encoder_file=m.encoder.variants[name].file, projector_file=m.projector.file, threads=threads,
                           max_batch=options.max_batch, provider=options.provider, static_frames=options.static_frames,
                           precise_int8=options.precise_int8)
        if enc.source_hash != m.source_hash:
            raise CheckpointError(f"{path}: made from another checkpoint than this bundle (source hash {enc.source_hash} vs {m.source_hash})")
        if enc.embed_dim != m.encoder.embed_dim or enc.hidden_size != m.projector.hidden_size or m.projector.hidden_size != m.decoder.hidden_size:
            raise CheckpointError(
                f"{path}: encoder width {enc.embed_dim} / projector output {enc.hidden_size} do not match the manifest "
                f"({m.encoder.embed_dim} / {m.projector.hidden_size}, decoder {m.decoder.hidden_size})"
            )
        return name, enc

    def check_decoder(self, path: Path, meta: dict[str, object]) -> None:
        """A GGUF header against the manifest: same checkpoint, width and audio token."""
        m = self.manifest
        if meta.get(G.KEY_SOURCE_HASH) != m.source_hash:
            raise CheckpointError(
                f"{path}: this decoder was made from another checkpoint (source hash {meta.get(G.KEY_SOURCE_HASH)}) than the "
                f"bundle's encoder ({m.source_hash}); re-export the bundle"
            )
        arch = str(meta.get(G.KEY_ARCHITECTURE))
        width = meta.get(G.key_embedding_length(arch))
        if width != m.decoder.hidden_size:
            raise CheckpointError(f"{path}: decoder width {width} != the projector's output {m.decoder.hidden_size}")
        if meta.get(G.KEY_AUDIO_TOKEN_ID) != m.tokens.audio:
            raise CheckpointError(f"{self.dir}: the tokenizer, decoder and manifest disagree on the <|AUDIO|> token id")

    def load_decoder(self, options: DecoderOptions = DecoderOptions(), *, threads: int | None = None) -> tuple[str, "LlamaDecoder"]:
        """The decoder variant ``options`` name (default: the manifest's), its header checked
        against the manifest before llama.cpp loads it; repacked weights where ``options`` leave
        them unset and the prompt engine evaluates prompts on a build that repacks safely."""
        from .decoder import LlamaDecoder, extra_bufts_safe

        name, path = self.variant("decoder", options.variant)
        meta = G.read_gguf_metadata(path)
        self.check_decoder(path, meta)
        prefill = self.load_prefill(options, meta, threads=threads)
        extra_bufts = options.extra_bufts
        if extra_bufts is None:
            extra_bufts = prefill is not None and extra_bufts_safe()
        return name, LlamaDecoder(path, n_ctx=options.n_ctx, threads=threads, n_batch=options.n_batch, f32_kv=options.f32_kv,
                                  flash_attn=options.flash_attn, extra_bufts=extra_bufts, one_batch=options.one_batch,
                                  prefill=prefill)

    def load_prefill(self, options: DecoderOptions, decoder_meta: dict[str, object], *, threads: int | None = None) -> "PrefillEngine | None":
        """The prompt engine ``options.prefill`` asks for, checked against the manifest; ``None``
        where llama.cpp evaluates prompts. ``"auto"`` uses it where :func:`engine_by_default` says."""
        from .cpu import cpu_info
        from .options import resolve_threads
        from .prefill import PrefillEngine

        part = self.manifest.prefill
        if options.prefill == "llama":
            return None
        if part is None:
            if options.prefill == "onnx":
                raise OptionError("prefill", f"{self.dir}: this bundle has no prompt engine (re-export it with a quantized decoder)")
            return None
        if options.prefill == "auto" and not engine_by_default(options, decoder_meta):
            return None
        engine = PrefillEngine(self.file(part.file), threads=resolve_threads(threads), precise_int8=cpu_info().int8_saturates)
        if engine.source_hash != self.manifest.source_hash:
            raise CheckpointError(f"{engine.path}: made from another checkpoint than this bundle (source hash {engine.source_hash} vs "
                                  f"{self.manifest.source_hash})")
        return engine
