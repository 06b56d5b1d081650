"""``manifest.json``, the table of contents of a bundle: its schema, parsed and written here only
(the exporter builds a :class:`Manifest` and writes it; the runtime reads it back). Torch-free.

Every field is type-checked on reading, so a malformed manifest fails with one line naming the
file and the field, never a traceback. File names must be relative paths inside the bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, TypeVar

from .errors import CheckpointError, one_line

MANIFEST = "manifest.json"
FORMAT = "mdl-edge-bundle"
FORMAT_VERSION = 1
_MAX_BYTES = 1 << 24  # a manifest is a few kB; a huge one is not ours

T = TypeVar("T")


def check_file_name(name: object, where: str) -> str:
    """A manifest file name: a non-empty relative path with no ``..`` (it stays in the folder).
    Where the bytes finally live (a symlink into a download cache) is the user's business."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where} must be a file name (a non-empty string), got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\x00" in name:
        raise CheckpointError(f"{where} = {name!r}: an absolute path; bundle files are named relative to the bundle folder")
    if ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(f"{where} = {name!r} points outside the bundle folder")
    return name


class _Fields:
    """Typed access to one JSON object of the manifest; errors name the file and the field."""

    def __init__(self, obj: object, where: str, path: str) -> None:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: {where or 'the manifest'} must be a JSON object, got {_kind(obj)}")
        self.obj, self.where, self.path = obj, where, path

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, check: Callable[[object], bool], want: str, default: Any = ...) -> Any:
        if key not in self.obj:
            if default is ...:
                raise CheckpointError(f"{self.path}: field '{self.name(key)}' is missing")
            return default
        value = self.obj[key]
        if not check(value):
            raise CheckpointError(f"{self.path}: field '{self.name(key)}' must be {want}, got {_kind(value)}")
        return value

    def str(self, key: str, default: Any = ...) -> str:
        return self.get(key, lambda v: isinstance(v, str), "a string", default)

    def int(self, key: str, default: Any = ...) -> int:
        return self.get(key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0", default)

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key, lambda v: isinstance(v, dict), "a JSON object"), self.name(key), self.path)

    def file(self, key: str) -> str:
        return check_file_name(self.get(key, lambda v: True, ""), f"{self.path}: field '{self.name(key)}'")


def _kind(v: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return f"{names.get(type(v), type(v).__name__)} {json.dumps(v)[:40] if isinstance(v, (str, int, float, bool)) or v is None else ''}".rstrip()


@dataclass(frozen=True)
class Variant:
    """One file of a part: ``file`` (relative to the bundle), its size, and the drift measured
    against full precision when it was made (encoder variants)."""

    file: str
    bytes: int | None = None
    drift_vs_fp32: dict[str, float] | None = None

    @classmethod
    def parse(cls, f: _Fields) -> "Variant":
        drift = f.get("drift_vs_fp32", lambda v: v is None or isinstance(v, dict), "an object or null", None)
        return cls(f.file("file"), f.int("bytes", None), drift)

    def to_json(self) -> dict[str, Any]:
        out = {"file": self.file, "bytes": self.bytes, "drift_vs_fp32": self.drift_vs_fp32}
        return {k: v for k, v in out.items() if v is not None}


def _variants(f: _Fields) -> tuple[str, dict[str, Variant]]:
    vs = f.sub("variants")
    variants = {name: Variant.parse(vs.sub(name)) for name in vs.obj}
    if not variants:
        raise CheckpointError(f"{f.path}: field '{vs.where}' lists no variants")
    default = f.str("default", next(iter(variants)))
    if default not in variants:
        raise CheckpointError(f"{f.path}: field '{f.name('default')}' is {default!r}, which is not one of its variants ({', '.join(variants)})")
    return default, variants


@dataclass(frozen=True)
class VariantsPart:
    """A part that comes in variants: their files, and the one used when none is named."""

    default: str
    variants: dict[str, Variant]


@dataclass(frozen=True)
class EncoderPart(VariantsPart):
    """The ONNX audio encoder: its width and depth, and its variants (``fp32``, ``int8``, ...)."""

    embed_dim: int
    depth: int
    chunk_frames: int


@dataclass(frozen=True)
class ProjectorPart:
    """The ONNX projector: ``[N, in_dim]`` stacked frames -> ``[N, hidden_size]``."""

    file: str
    in_dim: int
    hidden_size: int


@dataclass(frozen=True)
class DecoderPart(VariantsPart):
    """The GGUF decoder: architecture, width, vocabulary, and its variants (``f16``, ``Q4_K_M``, ...)."""

    arch: str
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class PrefillPart:
    """The prompt engine (``runtime/prefill.py``): its int8 ONNX graph, made from the decoder
    variant ``source`` (a bundle without a quantized decoder has none)."""

    file: str
    source: str
    drift_vs_fp32: dict[str, float] | None = None


@dataclass(frozen=True)
class TokenIds:
    """Special-token ids the prompt and the stop rule use (checked against the tokenizer and the GGUF)."""

    audio: int
    audio_bos: int
    audio_eos: int
    im_end: int
    end_of_text: int
    stop: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``, typed."""

    source_hash: str
    source_name: str
    encoder: EncoderPart
    projector: ProjectorPart
    decoder: DecoderPart
    tokens: TokenIds
    chat_template: str
    prefill: PrefillPart | None = None
    format_version: int = field(default=FORMAT_VERSION)

    def part(self, name: str) -> VariantsPart:
        """``"encoder"`` or ``"decoder"``: the parts that come in variants."""
        return {"encoder": self.encoder, "decoder": self.decoder}[name]

    # -- reading ----------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """Parse and type-check a manifest file."""
        path = Path(path)
        try:
            if path.stat().st_size > _MAX_BYTES:
                raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large for a bundle manifest")
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: not readable as JSON: {one_line(e)}") from e
        return cls.from_json(obj, str(path))

    @classmethod
    def from_json(cls, obj: object, path: str = MANIFEST) -> "Manifest":
        """A manifest from its parsed JSON; ``path`` names it in errors."""
        top = _Fields(obj, "", path)
        if top.obj.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an mdl-edge bundle manifest (field 'format' is not {FORMAT!r})")
        version = top.get("format_version", lambda v: True, "")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: bundle format version {version!r} (this mdl-edge reads {FORMAT_VERSION}); re-export the bundle")
        enc, proj, dec, tok = top.sub("encoder"), top.sub("projector"), top.sub("decoder"), top.sub("tokens")
        prefill = None
        if top.obj.get("prefill") is not None:
            pf = top.sub("prefill")
            drift = pf.get("drift_vs_fp32", lambda v: v is None or isinstance(v, dict), "an object or null", None)
            prefill = PrefillPart(pf.file("file"), pf.str("source"), drift)
        stop = tok.get("stop", lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v), "a list of token ids")
        return cls(
            source_hash=top.str("source_hash"),
            source_name=top.str("source_name", ""),
            encoder=EncoderPart(*_variants(enc), embed_dim=enc.int("embed_dim"), depth=enc.int("depth"), chunk_frames=enc.int("chunk_frames")),
            projector=ProjectorPart(proj.file("file"), proj.int("in_dim"), proj.int("hidden_size")),
            decoder=DecoderPart(*_variants(dec), arch=dec.str("arch"), hidden_size=dec.int("hidden_size"), vocab_size=dec.int("vocab_size")),
            tokens=TokenIds(tok.int("audio"), tok.int("audio_bos"), tok.int("audio_eos"), tok.int("im_end"), tok.int("end_of_text"), tuple(stop)),
            chat_template=top.str("chat_template", ""),
            prefill=prefill,
        )

    # -- writing ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def part(p: VariantsPart, **fields: Any) -> dict[str, Any]:
            return {**fields, "default": p.default, "variants": {k: v.to_json() for k, v in p.variants.items()}}

        e, d, t = self.encoder, self.decoder, self.tokens
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "source_hash": self.source_hash,
            "source_name": self.source_name,
            "encoder": part(e, embed_dim=e.embed_dim, depth=e.depth, chunk_frames=e.chunk_frames),
            "projector": {"file": self.projector.file, "in_dim": self.projector.in_dim, "hidden_size": self.projector.hidden_size},
            "decoder": part(d, arch=d.arch, hidden_size=d.hidden_size, vocab_size=d.vocab_size),
            "tokens": {"audio": t.audio, "audio_bos": t.audio_bos, "audio_eos": t.audio_eos, "im_end": t.im_end,
                       "end_of_text": t.end_of_text, "stop": list(t.stop)},
            "chat_template": self.chat_template,
            **({"prefill": {k: v for k, v in vars(self.prefill).items() if v is not None}} if self.prefill else {}),
        }

    def write(self, path: str | Path) -> None:
        """Write the manifest (checked by parsing it back first: the writer cannot emit what the
        reader refuses)."""
        obj = self.to_json()
        Manifest.from_json(obj, str(path))
        Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
