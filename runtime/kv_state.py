"""llama.cpp's saved state of one sequence's KV cache, the bytes ``llama_state_seq_get_data``
gives and ``llama_state_seq_set_data`` takes: written and read here only.

The prompt engine (``runtime/prefill.py``) computes a prompt's keys and values elsewhere and
hands them to llama.cpp in this form. The layout follows llama.cpp's ``src/llama-kv-cache.cpp``
(``state_write``, ``state_write_meta``, ``state_write_data``) for the caches mdl-edge creates:
one unified stream, and no per-cell extras (those exist only for M-RoPE and per-layer-embedding
models, not Qwen2/Qwen3). ``llama_context::state_seq_get_data`` puts a magic number and the
sequence id in front::

    u32 magic 0xaf143cd8, i32 seq_id
    u32 n_stream                                   (1: mdl-edge's cache is unified)
    u32 cell_count
    cell_count x (i32 pos, u32 n_seq_id = 1, i32 seq_id)
    u32 v_trans, u32 n_layer
    n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)
    v_trans = 0: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
    v_trans = 1: n_layer x (i32 v_type, u32 element_bytes, u32 n_embd_v, n_embd_v x cell_count)

``v_trans`` is 1 when flash attention is off. :func:`save_sequence` and :func:`restore_sequence`
make llama.cpp's two calls for a context its owner (``runtime/decoder.py``) passes in. Torch-free.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import MdlEdgeError

# ggml types a KV cache of mdl-edge's holds (ggml.h, enum ggml_type) and their numpy dtypes.
KV_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
#: the KV cache's element type outside parity mode (half the memory of f32, which parity mode keeps)
KV_CACHE_DTYPE = KV_DTYPES[1]
KV_TYPE_IDS = {dt: t for t, dt in KV_DTYPES.items()}
MAGIC = 0xAF143CD8  # llama-context.cpp, io_magic


@dataclass(frozen=True)
class SequenceKV:
    """The KV cells of one sequence: ``positions`` ``[n]`` int32, ``k`` and ``v`` ``[n_layer, n,
    kv_dim]`` (float16 or float32, the cache's own type), and whether llama.cpp stores V transposed."""

    positions: np.ndarray
    k: np.ndarray
    v: np.ndarray
    v_trans: bool

    def __post_init__(self) -> None:
        if self.k.ndim != 3 or self.k.shape != self.v.shape or self.k.shape[1] != self.positions.shape[0]:
            raise ValueError(f"keys {self.k.shape}, values {self.v.shape} and {self.positions.shape[0]} positions do not agree")
        if self.k.dtype.newbyteorder("<") not in KV_TYPE_IDS or self.v.dtype != self.k.dtype:
            raise ValueError(f"KV cells must be float16 or float32, got {self.k.dtype} / {self.v.dtype}")

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])


class SequenceBlob:
    """A ``llama_state_seq_set_data`` buffer for ``n`` cells at ``positions``, its headers written
    and its key and value rows left for the caller to fill through :meth:`k` and :meth:`v` (so a
    30 s prompt's ~20 MB of cells are written once, where they will be read)."""

    def __init__(self, positions: np.ndarray, n_layer: int, dim: int, dtype: np.dtype, *, v_trans: bool, seq_id: int = 0) -> None:
        n = int(positions.shape[0])
        dtype = np.dtype(dtype).newbyteorder("<")
        if dtype not in KV_TYPE_IDS:
            raise ValueError(f"KV cells must be float16 or float32, got {dtype}")
        self.n_cells, self.n_layer, self.dim, self.dtype, self.v_trans = n, n_layer, dim, dtype, v_trans
        head = struct.pack("<IiII", MAGIC, seq_id, 1, n)
        type_id, row = KV_TYPE_IDS[dtype], dim * dtype.itemsize
        k_head = struct.pack("<iQ", type_id, row)
        v_head = struct.pack("<iII", type_id, dtype.itemsize, dim) if v_trans else struct.pack("<iQ", type_id, row)
        cell = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])
        size = len(head) if n == 0 else len(head) + n * cell.itemsize + 8 + n_layer * (len(k_head) + len(v_head) + 2 * n * row)
        self.data = bytearray(size)
        view = memoryview(self.data)
        view[: len(head)] = head
        self._k: list[int] = []
        self._v: list[int] = []
        if n == 0:
            return
        at = len(head)
        cells = np.frombuffer(self.data, dtype=cell, count=n, offset=at)
        cells["pos"], cells["n_seq"], cells["seq"] = positions, 1, seq_id
        at += cells.nbytes
        view[at : at + 8] = struct.pack("<II", int(v_trans), n_layer)
        at += 8
        for offsets, layer_head in ((self._k, k_head), (self._v, v_head)):
            for _ in range(n_layer):
                view[at : at + len(layer_head)] = layer_head
                offsets.append(at + len(layer_head))
                at += len(layer_head) + n * row

    def k(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s key rows ``[n, dim]``, a writable view into :attr:`data`."""
        return np.frombuffer(self.data, dtype=self.dtype, count=self.n_cells * self.dim, offset=self._k[layer]).reshape(self.n_cells, self.dim)

    def v(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s values: ``[n, dim]``, or ``[dim, n]`` when llama.cpp stores them
        transposed (``v_trans``); a writable view into :attr:`data`."""
        shape = (self.dim, self.n_cells) if self.v_trans else (self.n_cells, self.dim)
        return np.frombuffer(self.data, dtype=self.dtype, count=self.n_cells * self.dim, offset=self._v[layer]).reshape(shape)


def write_sequence(kv: SequenceKV, seq_id: int = 0) -> SequenceBlob:
    """``kv`` in the layout ``llama_state_seq_set_data`` reads."""
    n_layer, n, dim = kv.k.shape
    blob = SequenceBlob(kv.positions, n_layer, dim, kv.k.dtype, v_trans=kv.v_trans, seq_id=seq_id)
    if n:
        for il in range(n_layer):
            blob.k(il)[:] = kv.k[il]
            blob.v(il)[:] = kv.v[il].T if kv.v_trans else kv.v[il]
    return blob


class _Reader:
    def __init__(self, blob: bytes | bytearray) -> None:
        self.blob, self.at = memoryview(blob), 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.blob):
            raise MdlEdgeError(f"llama.cpp sequence state ends early (byte {self.at} of {len(self.blob)})")
        out = struct.unpack_from(fmt, self.blob, self.at)
        self.at += size
        return out

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        size = dtype.itemsize * count
        if self.at + size > len(self.blob):
            raise MdlEdgeError(f"llama.cpp sequence state ends early (byte {self.at} of {len(self.blob)})")
        out = np.frombuffer(self.blob, dtype=dtype, count=count, offset=self.at)
        self.at += size
        return out


def read_sequence(blob: bytes | bytearray) -> SequenceKV:
    """The cells of a ``llama_state_seq_get_data`` blob (keys and values in the cache's type).

    Raises :class:`MdlEdgeError` for a layout this module does not write (several streams with
    cells, per-cell extras, a quantized cache)."""
    r = _Reader(blob)
    magic, _seq, n_stream = r.take("<IiI")
    if magic != MAGIC:
        raise MdlEdgeError(f"llama.cpp sequence state starts with {magic:#x}, not {MAGIC:#x}: a llama.cpp whose layout mdl-edge does not know")
    counts = []
    body: SequenceKV | None = None
    for _ in range(n_stream):
        (n,) = r.take("<I")
        counts.append(n)
        if n == 0:
            continue
        if body is not None:
            raise MdlEdgeError("llama.cpp sequence state has cells in more than one stream")
        body = _read_cells(r, n)
    if r.at != len(r.blob):
        raise MdlEdgeError(f"llama.cpp sequence state has {len(r.blob) - r.at} unread bytes: not the layout mdl-edge knows")
    if body is None:
        empty = np.zeros((0, 0, 0), np.float16)
        return SequenceKV(np.zeros(0, np.int32), empty, empty, False)
    return body


def _read_cells(r: _Reader, n: int) -> SequenceKV:
    cells = r.array(np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")]), n)
    if np.any(cells["n_seq"] != 1):
        raise MdlEdgeError("llama.cpp sequence state has cells of several sequences or per-cell extras")
    v_trans, n_layer = r.take("<II")
    ks, vs = [], []
    dtype = None
    for _ in range(n_layer):
        t, row = r.take("<iQ")
        dtype = _kv_dtype(t)
        if row % dtype.itemsize:
            raise MdlEdgeError(f"llama.cpp sequence state: key rows of {row} bytes are not whole {dtype} values")
        ks.append(r.array(dtype, n * row // dtype.itemsize).reshape(n, -1))
    for _ in range(n_layer):
        if v_trans:
            t, el, dim = r.take("<iII")
            dtype = _kv_dtype(t)
            vs.append(r.array(dtype, dim * n).reshape(dim, n).T)
        else:
            t, row = r.take("<iQ")
            dtype = _kv_dtype(t)
            vs.append(r.array(dtype, n * row // dtype.itemsize).reshape(n, -1))
    return SequenceKV(cells["pos"].astype(np.int32), np.stack(ks), np.stack(vs), bool(v_trans))


def _kv_dtype(type_id: int) -> np.dtype:
    if type_id not in KV_DTYPES:
        raise MdlEdgeError(f"llama.cpp sequence state: KV cache of ggml type {type_id}; mdl-edge hands over f16 and f32 caches only")
    return KV_DTYPES[type_id]


def save_sequence(llama: Any, ctx: Any, seq_id: int = 0) -> SequenceKV:
    """The KV cells of sequence ``seq_id`` of a llama.cpp context (``llama``: the ``llama_cpp``
    module). Raises :class:`MdlEdgeError` where llama.cpp saves another layout."""
    size = llama.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_ubyte * size)()
    got = llama.llama_state_seq_get_data(ctx, buf, size, seq_id)
    if got != size:
        raise MdlEdgeError(f"llama.cpp saved {got} of {size} bytes of the sequence state")
    return read_sequence(bytes(buf))


def restore_sequence(llama: Any, ctx: Any, kv: "SequenceKV | SequenceBlob", seq_id: int = 0) -> None:
    """Replace sequence ``seq_id``'s KV cells in a llama.cpp context with ``kv`` (cells, or a blob
    already filled for ``seq_id``)."""
    data = (kv if isinstance(kv, SequenceBlob) else write_sequence(kv, seq_id)).data
    buf = (ctypes.c_ubyte * len(data)).from_buffer(data)
    if llama.llama_state_seq_set_data(ctx, buf, len(data), seq_id) != len(data):
        raise MdlEdgeError("llama.cpp refused the keys and values handed to it (see the mdl_edge.llama_cpp log)")
