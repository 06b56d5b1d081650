"""The GGUF decoder file as mdl-edge reads and writes it: the header reader (with GGUF's value-type
table) and the ``mdl_edge.*`` metadata keys that ``export/gguf_decoder.py`` writes (torch-free).

The header is validated before llama.cpp parses the file (magic, version, counts, and that the
tensor data fits in the file; cf. CVE-2024-21802 / CVE-2024-21836).
"""

from __future__ import annotations

import struct
from pathlib import Path

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


def key_embedding_length(arch: str) -> str:
    """The decoder width key of an architecture (``qwen2.embedding_length``)."""
    return f"{arch}.embedding_length"


# GGUF value types (gguf.h, enum gguf_type): id -> struct format of a scalar.
TYPE_STRING = 8
TYPE_ARRAY = 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# Sanity limits: a header beyond them is corrupt or hostile, not a model.
_MAX_STRING = 1 << 26
_MAX_ARRAY = 1 << 24
_MAX_COUNT = 1 << 20
_MAX_DIMS = 4
_SHORT_ARRAY = 16  # arrays up to this many items are returned whole, longer ones as their length


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """Validate a GGUF file's header and return its key/value metadata (arrays of more than 16
    items as their length). Raises :class:`CheckpointError` naming the file for anything wrong."""
    path = Path(path)
    try:
        f = open(path, "rb")
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
    with f:
        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise CheckpointError(f"{path}: truncated GGUF (header ends early)")
            return b

        def unpack(fmt: str) -> int:
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

        def string() -> str:
            n = unpack("<Q")
            if n > _MAX_STRING:
                raise CheckpointError(f"{path}: corrupt GGUF (a string of {n} bytes)")
            return read(n).decode("utf-8", errors="replace")

        def value(t: int, depth: int = 0) -> object:
            if t == TYPE_STRING:
                return string()
            if t == TYPE_ARRAY:
                et, n = unpack("<I"), unpack("<Q")
                if n > _MAX_ARRAY or depth > 0 and et == TYPE_ARRAY:
                    raise CheckpointError(f"{path}: corrupt GGUF (an array of {n} items of type {et})")
                items = [value(et, depth + 1) for _ in range(n)]
                return items if n <= _SHORT_ARRAY else len(items)
            if t not in SCALAR_FORMATS:
                raise CheckpointError(f"{path}: corrupt GGUF (value type {t})")
            return unpack(SCALAR_FORMATS[t])

        if read(4) != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
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
        for _ in range(n_tensors):
            string()
            nd = unpack("<I")
            if nd > _MAX_DIMS:
                raise CheckpointError(f"{path}: corrupt GGUF tensor info ({nd} dims)")
            read(8 * nd + 4)  # dims, then the ggml type
            max_end = max(max_end, unpack("<Q"))
        align = meta.get(KEY_ALIGNMENT, 32)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1:
            raise CheckpointError(f"{path}: corrupt GGUF ({KEY_ALIGNMENT} = {align!r})")
        data_start = (f.tell() + align - 1) // align * align
        if data_start + max_end > size:
            raise CheckpointError(f"{path}: truncated GGUF (tensor data runs past the end of the file)")
    return meta
