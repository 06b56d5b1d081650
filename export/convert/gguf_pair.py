"""The official GGUF pair as an export input: a llama.cpp text GGUF (Qwen2/Qwen3, tokenizer and
chat template in its ``tokenizer.*`` keys) and the fork's mmproj GGUF (the audio tower).

The text GGUF is used as it is: its tensors are copied byte for byte into the bundle's decoder,
whose header gains mdl-edge's identity keys; further decoder variants are quantized from it by
llama.cpp. The tokenizer becomes a ``tokenizers`` tokenizer built from the GGUF vocabulary and
merges (llama.cpp's ``qwen2`` pre-tokenizer), and the mmproj becomes the ONNX encoder.
A pair that does not belong together is refused naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...runtime import gguf_meta as G
from ...runtime.errors import CheckpointError, ConfigError
from ...runtime.prompt import SPECIAL_TOKENS, PromptFormat
from ..synthetic.tokenizer import QWEN_SPLIT_PATTERN

logger = logging.getLogger("mdl_edge")

TEXT_ARCHS = ("qwen2", "qwen3")


@dataclass(frozen=True)
class GgufPair:
    """The two files of a pair and what was read from their headers."""

    text: Path
    mmproj: Path
    text_meta: dict[str, object]
    mmproj_meta: dict[str, object]

    @property
    def arch(self) -> str:
        return str(self.text_meta[G.KEY_ARCHITECTURE])


def _snapshot(folder: Path) -> Path:
    """A Hugging Face cache repository folder (``models--org--name``) -> its current snapshot."""
    ref = folder / "refs" / "main"
    if (folder / "snapshots").is_dir():
        if ref.is_file():
            snap = folder / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
        snaps = sorted((folder / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        if snaps:
            return snaps[-1]
    return folder


def is_gguf_pair_dir(folder: str | Path) -> bool:
    """Whether ``folder`` (or its Hugging Face snapshot) holds GGUF files and no config.json."""
    d = _snapshot(Path(folder))
    return d.is_dir() and not (d / "config.json").is_file() and any(d.glob("*.gguf"))


def find_pair(folder: str | Path) -> GgufPair:
    """The text GGUF and the mmproj of ``folder``: exactly one of each (files are told apart by
    their ``general.architecture``), checked to belong together."""
    from .mmproj import KEY_PROJ_DIM, projector_type

    d = _snapshot(Path(folder))
    files = sorted(d.glob("*.gguf"))
    metas = {f: G.read_gguf_metadata(f) for f in files}
    mmprojs = [f for f, m in metas.items() if m.get(G.KEY_ARCHITECTURE) == "clip"]
    texts = [f for f, m in metas.items() if m.get(G.KEY_ARCHITECTURE) != "clip"]
    if len(mmprojs) != 1 or len(texts) != 1:
        raise CheckpointError(
            f"{d}: expected one text GGUF and one mmproj GGUF, found {len(texts)} text ({', '.join(f.name for f in texts) or 'none'}) "
            f"and {len(mmprojs)} mmproj ({', '.join(f.name for f in mmprojs) or 'none'}); keep one of each in the folder"
        )
    pair = GgufPair(texts[0], mmprojs[0], metas[texts[0]], metas[mmprojs[0]])
    if pair.arch not in TEXT_ARCHS:
        raise CheckpointError(f"{pair.text}: {G.KEY_ARCHITECTURE} is {pair.arch!r}; MiDashengLM's decoders are {', '.join(TEXT_ARCHS)}")
    projector_type(pair.mmproj_meta, pair.mmproj)
    width = pair.text_meta.get(G.key_embedding_length(pair.arch))
    proj = pair.mmproj_meta.get(KEY_PROJ_DIM)
    if width != proj:
        raise CheckpointError(
            f"{pair.mmproj}: {KEY_PROJ_DIM} is {proj}, but {pair.text.name} has {G.key_embedding_length(pair.arch)} {width}: "
            "the two files are not one model"
        )
    for key, want in (("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "qwen2")):
        if pair.text_meta.get(key) != want:
            raise CheckpointError(f"{pair.text}: {key} is {pair.text_meta.get(key)!r}; MiDashengLM's Qwen tokenizers are {want!r}")
    return pair


def _field(reader: Any, key: str, path: Path) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise CheckpointError(f"{path}: key {key!r} is missing")
    return f.contents()


def gguf_tokenizer(path: str | Path) -> tuple[Any, str, list[int]]:
    """``(tokenizers.Tokenizer, chat template, stop ids)`` from a text GGUF's ``tokenizer.*`` keys:
    byte-level BPE over the GGUF vocabulary and merges with the Qwen2 split pattern (llama.cpp's
    ``qwen2`` pre-tokenizer); control tokens become special added tokens, user-defined ones
    plain added tokens, unused rows stay out of the vocabulary."""
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    p = Path(path)
    reader = gguf.GGUFReader(str(p))
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", p)
    types: list[int] = _field(reader, "tokenizer.ggml.token_type", p)
    merges: list[str] = _field(reader, "tokenizer.ggml.merges", p)
    if len(types) != len(tokens):
        raise CheckpointError(f"{p}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    template = reader.fields.get("tokenizer.chat_template")
    chat_template = template.contents() if template is not None else None
    if not chat_template:
        raise CheckpointError(f"{p}: tokenizer.chat_template is missing; MiDashengLM's prompt comes from the checkpoint's template")
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == gguf.TokenType.NORMAL}
    tok = Tokenizer(models.BPE(vocab=normal, merges=[tuple(m.split(" ", 1)) for m in merges], byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = []
    for i, (t, k) in enumerate(zip(tokens, types)):
        if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            added.append((i, t, k == gguf.TokenType.CONTROL))
    # tokenizers numbers added tokens after the vocabulary in the order given; the GGUF ids are
    # kept by adding them in id order over a vocabulary that already holds every lower id.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": special}
        for i, t, special in added
    ]
    out = Tokenizer.from_str(json.dumps(data))
    for i, t, _ in added:
        if out.token_to_id(t) != i:
            raise CheckpointError(f"{p}: token {t!r} does not keep its id {i} (duplicate token text?)")
    missing = [t for t in SPECIAL_TOKENS if out.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"{p}: the vocabulary has no {', '.join(missing)} token(s): not a MiDashengLM text GGUF")
    stop = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        f = reader.fields.get(key)
        if f is not None:
            stop.append(int(f.contents()))
    return out, str(chat_template), stop


def fingerprint(paths: list[Path]) -> str:
    """A fingerprint of model files: sizes, the first MiB and 64 KiB at 16 places in each."""
    h = hashlib.blake2b(digest_size=16)
    for f in paths:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(65536))
    return h.hexdigest()


def rewrite_gguf(src: Path, dst: Path, *, extra: dict[str, tuple[Any, Any]] | None = None, drop: Callable[[str], bool] = lambda key: False,
                 tensors: Callable[[Any], list[tuple[str, Any, Any]]] | None = None) -> Path:
    """``src`` rewritten to ``dst``: keys for which ``drop`` is true left out, ``extra`` keys (name
    -> (value, GGUFValueType)) added or replacing theirs, every other key as it is; each tensor
    copied byte for byte, or replaced by what ``tensors(reader_tensor)`` returns as
    ``[(name, raw data, ggml type), ...]``."""
    import gguf

    from .gguf_decoder import gguf_output

    extra = extra or {}
    reader = gguf.GGUFReader(str(src))
    with gguf_output(dst, str(reader.fields[G.KEY_ARCHITECTURE].contents())) as w:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in (G.KEY_ARCHITECTURE, *extra) or drop(field.name):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        for key, (value, vtype) in extra.items():
            sub = gguf.GGUFValueType.get_type(value[0]) if vtype == gguf.GGUFValueType.ARRAY and value else None
            w.add_key_value(key, value, vtype, sub_type=sub)
        for t in reader.tensors:
            for name, data, raw_type in tensors(t) if tensors else [(t.name, t.data, t.tensor_type)]:
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return dst


def export_bundle_from_pair(folder: str | Path, out_dir: str | Path, *, encoders: list[str], decoders: list[str], progress=print) -> Path:
    """A bundle from a GGUF pair: encoder variants from the mmproj, the text GGUF as its own
    decoder variant (named by its type) plus ``decoders`` quantized from it by llama.cpp."""
    import gguf

    from ...quantize.decoder import GGUF_TYPES, quantize_decoder
    from ...quantize.encoder import VARIANTS as ENCODER_VARIANTS
    from .bundle import finish_bundle
    from .mmproj import read_mmproj
    from .onnx_encoder import write_audio_onnx

    bad = [e for e in encoders if e != "fp32" and e not in ENCODER_VARIANTS]
    if bad:
        raise ConfigError(f"unknown encoder variant(s): {', '.join(bad)}; choose from fp32, {', '.join(ENCODER_VARIANTS)}")
    pair = find_pair(folder)
    file_type = pair.text_meta.get(G.KEY_FILE_TYPE)
    base_name = G.FILE_TYPES.get(file_type if isinstance(file_type, int) else -1)
    if base_name is None:
        raise CheckpointError(f"{pair.text}: general.file_type {file_type!r} is not a type mdl-edge knows ({', '.join(G.FILE_TYPES.values())})")
    bad = [d for d in decoders if d != base_name and d not in GGUF_TYPES]
    if bad:
        raise ConfigError(
            f"decoder variant(s) {', '.join(bad)} cannot be made from {pair.text.name} ({base_name}); "
            f"quantized types: {', '.join(GGUF_TYPES)}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, template, stop = gguf_tokenizer(pair.text)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}) + "\n", encoding="utf-8")
    fmt = PromptFormat.from_dir(out)
    source = fingerprint([pair.text, pair.mmproj])
    t = time.perf_counter()
    tower = read_mmproj(pair.mmproj)
    write_audio_onnx(tower.encoder, tower.projector, tower.config, tower.hidden_size, source, out)
    progress(f"  mmproj ({tower.projector_type}) -> ONNX encoder + projector ({time.perf_counter() - t:.1f} s)")
    s = fmt.special
    base = rewrite_gguf(pair.text, out / f"decoder.{base_name}.gguf", extra={
        G.KEY_SOURCE_HASH: (source, gguf.GGUFValueType.STRING),
        G.KEY_AUDIO_TOKEN_ID: (s.audio, gguf.GGUFValueType.UINT32),
        G.KEY_AUDIO_BOS_TOKEN_ID: (s.audio_bos, gguf.GGUFValueType.UINT32),
        G.KEY_AUDIO_EOS_TOKEN_ID: (s.audio_eos, gguf.GGUFValueType.UINT32),
        G.KEY_ENCODER_EMBED_DIM: (tower.config.embed_dim, gguf.GGUFValueType.UINT32),
    })
    progress(f"  {pair.text.name} -> decoder {base_name} (copied, identity keys added)")
    dec_files = {base_name: base}
    for d in decoders:
        if d != base_name:
            t = time.perf_counter()
            dec_files[d] = quantize_decoder(base, out / f"decoder.{d}.gguf", d)
            progress(f"  decoder {d} ({time.perf_counter() - t:.1f} s)")
    embd = G.read_gguf_header(pair.text).tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise CheckpointError(f"{pair.text}: no token_embd.weight matrix")
    vocab = embd.shape[1]  # ggml order: [hidden, rows]
    return finish_bundle(
        out, encoders=encoders, decoder_files=dec_files, default_decoder=decoders[-1] if decoders else base_name, fmt=fmt,
        source_hash=source, source_name=pair.text.stem, embed_dim=tower.config.embed_dim, depth=tower.config.depth,
        hidden_size=tower.hidden_size, arch=pair.arch, vocab_size=int(vocab), prefill_source=(base_name, base), progress=progress,
    )
