"""The GGUF decoder file as mdl-edge reads and writes it: the header reader (with GGUF's value-type
table) and the ``mdl_edge.*`` metadata keys that ``export/convert/gguf_decoder.py`` writes (torch-free).

The header is validated before llama.cpp parses the file (magic, version, counts, and that every
tensor's data fits in the file; cf. CVE-2024-21802 / CVE-2024-21836).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)

# mdl-edge's own keys, written by the exporter and checked by the runtime.
KEY_SOURCE_HASH = "mdl_edge.source_hash"  # the checkpoint the decoder was made from
KEY_AUDIO_TOKEN_ID = "mdl_edge.audio_token_id"
KEY_AUDIO_BOS_TOKEN_ID = "mdl_edge.audio_bos_token_id"
KEY_AUDIO_EOS_TOKEN_ID = "mdl_edge.audio_eos_token_id"
KEY_ENCODER_EMBED_DIM = "mdl_edge.encoder_embed_dim"

# llama.cpp's keys that the runtime reads.
KEY_ARCHITECTURE = "general.architecture"
KEY_ALIGNMENT = "general.alignment"
KEY_FILE_TYPE = "general.file_type"

# llama.cpp's general.file_type (enum llama_ftype) -> mdl-edge's decoder variant name
FILE_TYPES = {0: "f32", 1: "f16", 7: "Q8_0", 2: "Q4_0", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 12: "Q3_K_M", 32: "bf16"}
FULL_PRECISION_TYPES = ("f32", "f16", "bf16")


def key_embedding_length(arch: str) -> str:
    """The decoder width key of an architecture (``qwen2.embedding_length``)."""
    return f"{arch}.embedding_length"


# GGUF value types (gguf.h, enum gguf_type): id -> struct format of a scalar.
TYPE_STRING = 8
TYPE_ARRAY = 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# ggml tensor types (ggml.h, enum ggml_type): id -> (elements per block, bytes per block), for
# the types mdl-edge writes or quantizes to; other types are only checked to start in the file.
TENSOR_BLOCKS = {
    0: (1, 4), 1: (1, 2), 30: (1, 2), 28: (1, 8), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),  # f32 f16 bf16 f64 i8-i64
    2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),  # Q2_K Q3_K Q4_K Q5_K Q6_K
}

# Sanity limits: a header beyond them is corrupt or hostile, not a model.
_MAX_STRING = 1 << 26
_MAX_ARRAY = 1 << 24
_MAX_COUNT = 1 << 20
_MAX_DIMS = 4
_SHORT_ARRAY = 16  # arrays up to this many items are returned whole, longer ones as their length


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies: ``shape`` in ggml order (``ne0`` first, the row length),
    ggml type id, absolute byte offset in the file."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    meta: dict[str, object]
    tensors: dict[str, TensorInfo]


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """Validate a GGUF file's header and return its key/value metadata (arrays of more than 16
    items as their length). Raises :class:`CheckpointError` naming the file for anything wrong."""
    return read_gguf_header(path).meta


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Validate a GGUF file's header: its metadata (as :func:`read_gguf_metadata`) and where each
    tensor lies.

    Parsed in place from a read-only map of the file. Arrays of more than 16 items are stepped
    over, not decoded: a Qwen vocabulary is two arrays of ~150,000 strings, and decoding them into
    Python objects nobody reads took 0.16 s of each read (0.02 s now), twice per model load."""
    path = Path(path)
    try:
        f = open(path, "rb")
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
    with f:
        if size < 4:
            raise CheckpointError(f"{path}: not a GGUF file (the file is {size} bytes)")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read: {e}") from e
        with buf:
            return _parse_header(path, buf, size)


def _parse_header(path: Path, buf: mmap.mmap, size: int) -> GGUFHeader:
    pos = 0
    u64 = struct.Struct("<Q")

    def truncated() -> CheckpointError:
        return CheckpointError(f"{path}: truncated GGUF (header ends early)")

    def unpack(fmt: str) -> int:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise truncated()
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += n
        return v

    def string() -> str:
        nonlocal pos
        n = unpack("<Q")
        if n > _MAX_STRING:
            raise CheckpointError(f"{path}: corrupt GGUF (a string of {n} bytes)")
        if pos + n > size:
            raise truncated()
        pos += n
        return buf[pos - n : pos].decode("utf-8", errors="replace")

    def skip_strings(count: int) -> None:
        nonlocal pos
        at, unpack_u64 = pos, u64.unpack_from
        for _ in range(count):
            if at + 8 > size:
                raise truncated()
            n = unpack_u64(buf, at)[0]
            if n > _MAX_STRING:
                raise CheckpointError(f"{path}: corrupt GGUF (a string of {n} bytes)")
            at += 8 + n
        if at > size:
            raise truncated()
        pos = at

    def value(t: int, depth: int = 0) -> object:
        nonlocal pos
        if t == TYPE_STRING:
            return string()
        if t == TYPE_ARRAY:
            et, n = unpack("<I"), unpack("<Q")
            if n > _MAX_ARRAY or depth > 0 and et == TYPE_ARRAY:
                raise CheckpointError(f"{path}: corrupt GGUF (an array of {n} items of type {et})")
            if n <= _SHORT_ARRAY:
                return [value(et, depth + 1) for _ in range(n)]
            if et == TYPE_STRING:
                skip_strings(n)
            elif et == TYPE_ARRAY:
                for _ in range(n):
                    value(et, depth + 1)
            elif et in SCALAR_FORMATS:
                pos += n * struct.calcsize(SCALAR_FORMATS[et])
                if pos > size:
                    raise truncated()
            else:
                raise CheckpointError(f"{path}: corrupt GGUF (an array of {n} items of type {et})")
            return n
        if t not in SCALAR_FORMATS:
            raise CheckpointError(f"{path}: corrupt GGUF (value type {t})")
        return unpack(SCALAR_FORMATS[t])

    if buf[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    pos = 4
    version = unpack("<I")
    if version not in VERSIONS:
        raise CheckpointError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise CheckpointError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(unpack("<I"))
    max_end = 0
    infos: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for _ in range(n_tensors):
        name = string()
        nd = unpack("<I")
        if nd > _MAX_DIMS:
            raise CheckpointError(f"{path}: corrupt GGUF tensor info ({nd} dims)")
        shape = tuple(unpack("<Q") for _ in range(nd))
        n_elements = int(np.prod(shape, dtype=np.uint64)) if shape else 1
        ggml_type, offset = unpack("<I"), unpack("<Q")
        infos[name] = (shape, ggml_type, offset)
        block, block_bytes = TENSOR_BLOCKS.get(ggml_type, (1, 0))
        if n_elements % block:
            raise CheckpointError(f"{path}: corrupt GGUF tensor {name!r} ({n_elements} elements in blocks of {block})")
        max_end = max(max_end, offset + n_elements // block * block_bytes)
    align = meta.get(KEY_ALIGNMENT, 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise CheckpointError(f"{path}: corrupt GGUF ({KEY_ALIGNMENT} = {align!r})")
    data_start = (pos + align - 1) // align * align
    if data_start + max_end > size:
        raise CheckpointError(f"{path}: truncated GGUF (tensor data runs past the end of the file)")
    return GGUFHeader(meta, {n: TensorInfo(sh, t, data_start + off) for n, (sh, t, off) in infos.items()})


TOKEN_EMBD = "token_embd.weight"


class TokenEmbeddings:
    """Rows of a GGUF decoder's ``token_embd`` as llama.cpp's input lookup gives them: the
    stored row, dequantized to float32 (by gguf-py, llama.cpp's own Python library, whose
    dequantization mirrors ggml's). Lets text tokens travel in the same batch as audio
    embeddings. Reads only the rows asked for (the file is memory-mapped)."""

    def __init__(self, path: str | Path, header: GGUFHeader | None = None) -> None:
        self.path = Path(path)
        header = header or read_gguf_header(self.path)
        info = header.tensors.get(TOKEN_EMBD)
        if info is None or len(info.shape) != 2:
            raise CheckpointError(f"{self.path}: no 2-D {TOKEN_EMBD} tensor")
        if info.ggml_type not in TENSOR_BLOCKS:
            raise CheckpointError(f"{self.path}: {TOKEN_EMBD} has ggml type {info.ggml_type}, which mdl-edge cannot read")
        self.n_embd, self.n_vocab = info.shape
        block, block_bytes = TENSOR_BLOCKS[info.ggml_type]
        self.ggml_type = info.ggml_type
        self._row_bytes = self.n_embd // block * block_bytes
        self._table = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(self.n_vocab, self._row_bytes))
        # imported with the model rather than on its first request, whose time to first token
        # would carry the import (~40 ms)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        self._dequantize, self._quant_type = dequantize, GGMLQuantizationType(self.ggml_type)

    def rows(self, ids: "np.ndarray | list[int] | tuple[int, ...]") -> np.ndarray:
        """``[len(ids), n_embd]`` float32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise CheckpointError(f"{self.path}: token id out of range 0..{self.n_vocab - 1}")
        raw = np.ascontiguousarray(self._table[ids])
        return np.ascontiguousarray(self._dequantize(raw, self._quant_type), dtype=np.float32).reshape(ids.size, self.n_embd)
