"""The prompt engine: a decoder's prompt pass on ONNX Runtime (int8), whose keys and values are
handed to llama.cpp's KV cache.

llama.cpp evaluates a prompt of a few dozen positions far below the machine's matrix rate; ONNX
Runtime's int8 MatMul runs the same pass 2-3x faster (``docs/benchmarks.md``). The
graph (``export/convert/onnx_prefill.py``) returns every layer's keys and values for the prompt
rows; :class:`~mdl_edge.runtime.decoder.LlamaDecoder` writes them into its cache in llama.cpp's
own sequence-state layout (``runtime/kv_state.py``) and lets llama.cpp evaluate the prompt's last
position, so the logits, the sampler and generation stay llama.cpp's. The session is owned here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .errors import CheckpointError, MdlEdgeError
from .kv_state import SequenceKV
from .onnx_meta import ort_session, read_metadata

logger = logging.getLogger("mdl_edge")

# Inputs and outputs of graphs exported before each layer had its own: every layer's keys, then
# values, stacked [n_layer, n, kv_dim]. They still load; the stacking costs copies of the cells.
STACKED_INPUTS = ("rows", "start", "past_k", "past_v")
STACKED_OUTPUTS = ("k", "v")


def layer_inputs(n_layer: int) -> list[str]:
    """The graph's inputs after ``rows`` and ``start``: each layer's cached keys ``past_k.<i>``
    ``[p, kv_dim]``, then its values ``past_v.<i>``. A long prompt runs in pieces, each reading
    the cells the pieces before it wrote, in place (:meth:`PrefillEngine.write_prompt`)."""
    return [f"past_k.{i}" for i in range(n_layer)] + [f"past_v.{i}" for i in range(n_layer)]


def layer_outputs(n_layer: int) -> list[str]:
    """The graph's outputs: each layer's keys ``k.<i>`` ``[n, kv_dim]``, then its values
    ``v.<i>``. Being separate, they can be written straight into the buffer handed to llama.cpp
    (:meth:`PrefillEngine.run_into`), so the prompt's cells exist once."""
    return [f"k.{i}" for i in range(n_layer)] + [f"v.{i}" for i in range(n_layer)]


# Types of the keys and values a graph takes and returns (its metadata's ``kv_dtype``; graphs
# without it are float32). Bundles carry float16, the KV cache's type, which ONNX Runtime casts
# to in a fraction of what numpy takes (a 30 s prompt's cells: ~1 ms against ~25 ms).
KV_DTYPES = ("float32", "float16")
# The most rows one engine run takes: a longer prompt runs in pieces (PrefillEngine.write_prompt).
# One run's working memory grows with its rows, its attention scores with their square: a
# 1,500-position prompt took +0.68 GB in one run (0.6B, 2-core AMX Xeon).
PIECE_ROWS = 256
# Keys or values cached before a run: [n_layer, p, kv_dim], or one [p, kv_dim] array per layer.
Past = Union[np.ndarray, Sequence[np.ndarray], None]
# Prompts of fewer new positions than this are left to llama.cpp, where the handover costs as
# much as it saves: measured on a 2-core AMX Xeon (0.6B, Q4_K_M), 2 / 4 / 6 / 8 positions took
# 76 / 61 / 63 / 65 ms through the engine and 49 / 59 / 80 / 80 ms in llama.cpp.
MIN_PREFILL_POSITIONS = 5


class PrefillEngine:
    """An ONNX prompt graph (``prefill.int8.onnx``): prompt rows -> every layer's keys and values.

    ``threads``: ORT intra-op threads; ``precise_int8``: the exact u8 x u8 int8 kernels (see
    :class:`~mdl_edge.runtime.encoder.AudioEncoder`)."""

    def __init__(self, path: str | Path, *, threads: int, precise_int8: bool = False) -> None:
        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads, precise_int8=precise_int8)
        self.meta = read_metadata(self.session, self.path)
        if self.meta.get("kind") != "prefill":
            raise CheckpointError(f"{self.path}: not a prompt graph (metadata kind {self.meta.get('kind')!r})")
        try:
            self.n_layer, self.hidden_size, self.kv_dim = (int(self.meta[k]) for k in ("n_layer", "hidden_size", "kv_dim"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: prompt graph metadata lacks its shape ({e})") from e
        self.source_hash = str(self.meta.get("source_hash", ""))
        kv_dtype = str(self.meta.get("kv_dtype", "float32"))
        if kv_dtype not in KV_DTYPES:
            raise CheckpointError(f"{self.path}: keys and values of type {kv_dtype!r} (known: {', '.join(KV_DTYPES)})")
        self.kv_dtype = np.dtype(kv_dtype)
        inputs, outputs = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        self.per_layer = outputs == layer_outputs(self.n_layer)
        self.per_layer_past = inputs == ["rows", "start", *layer_inputs(self.n_layer)]
        if not (self.per_layer or outputs == list(STACKED_OUTPUTS)) or not (self.per_layer_past or inputs == list(STACKED_INPUTS)):
            raise CheckpointError(f"{self.path}: inputs {inputs[:4]}... and outputs {outputs[:4]}... are not a prompt graph's of "
                                  f"{self.n_layer} layers")

    def run(self, rows: np.ndarray, start: int, past_k: Past = None, past_v: Past = None) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values ``[n_layer, n, kv_dim]`` (of :attr:`kv_dtype`) of ``rows`` (``[n, hidden]``)
        at positions ``start..start+n-1``, after the cached positions ``0..start-1`` whose keys and
        values are ``past_k`` / ``past_v`` (``[n_layer, start, kv_dim]``, or one ``[start, kv_dim]``
        array per layer; none when ``start`` is 0)."""
        feed = self._feed(rows, start, past_k, past_v)
        if not self.per_layer:
            k, v = self.session.run(list(STACKED_OUTPUTS), feed)
            return k, v
        out = self.session.run(None, feed)
        return np.stack(out[: self.n_layer]), np.stack(out[self.n_layer :])

    def run_into(self, rows: np.ndarray, start: int, k_out: Sequence[np.ndarray], v_out: Sequence[np.ndarray],
                 past_k: Past = None, past_v: Past = None) -> None:
        """:meth:`run`, with layer ``i``'s keys and values written into ``k_out[i]`` and
        ``v_out[i]`` (C-contiguous ``[n, kv_dim]`` arrays of :attr:`kv_dtype`, views into the
        buffer llama.cpp reads); ONNX Runtime writes them there itself, no copy made."""
        n = rows.shape[0]
        dests = [*k_out, *v_out]
        if len(dests) != 2 * self.n_layer or any(d.shape != (n, self.kv_dim) or d.dtype != self.kv_dtype or not d.flags.c_contiguous
                                                 or not d.flags.writeable for d in dests):
            raise ValueError(f"run_into needs {self.n_layer} writable C-contiguous [{n}, {self.kv_dim}] {self.kv_dtype} arrays each for keys and values")
        if not self.per_layer:  # a graph that stacks its outputs: copied from them
            k, v = self.run(rows, start, past_k, past_v)
            for dst, src in zip(dests, [*k, *v]):
                dst[...] = src
            return
        feed = self._feed(rows, start, past_k, past_v)
        io = self.session.io_binding()
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        for name, dst in zip(layer_outputs(self.n_layer), dests):
            io.bind_output(name, "cpu", 0, dst.dtype, dst.shape, dst.ctypes.data)
        self.session.run_with_iobinding(io)

    def write_prompt(self, rows: np.ndarray, k_out: Sequence[np.ndarray], v_out: Sequence[np.ndarray], *, piece: int | None = None) -> None:
        """The keys and values of a prompt from position 0, written into ``k_out`` / ``v_out`` (as
        :meth:`run_into`) in pieces of at most ``piece`` rows (default :data:`PIECE_ROWS`), each
        piece reading the cells the pieces before it wrote, in place. The graph's working memory
        grows with the rows of one run (attention scores with their square), so a long prompt's
        stays that of one piece."""
        piece = piece or PIECE_ROWS
        for s in range(0, rows.shape[0], piece):
            e = min(rows.shape[0], s + piece)
            past = ([k[:s] for k in k_out], [v[:s] for v in v_out]) if s else (None, None)
            self.run_into(rows[s:e], s, [k[s:e] for k in k_out], [v[s:e] for v in v_out], *past)

    def _feed(self, rows: np.ndarray, start: int, past_k: Past, past_v: Past) -> dict[str, np.ndarray]:
        layers = []
        for name, past in (("keys", past_k), ("values", past_v)):
            if past is None:
                past = [np.zeros((0, self.kv_dim), self.kv_dtype)] * self.n_layer
            if len(past) != self.n_layer or any(p.shape != (start, self.kv_dim) for p in past):
                raise ValueError(f"past {name} {[p.shape for p in past][:2]}... do not fit {start} positions of {self.path.name}")
            layers.append([np.ascontiguousarray(p, dtype=self.kv_dtype) for p in past])
        feed = {"rows": np.ascontiguousarray(rows, dtype=np.float32), "start": np.asarray(start, dtype=np.int64)}
        if self.per_layer_past:
            return {**feed, **dict(zip(layer_inputs(self.n_layer), layers[0] + layers[1]))}
        return {**feed, "past_k": np.stack(layers[0]), "past_v": np.stack(layers[1])}

    def check(self, n_layer: int, n_embd: int, saved: SequenceKV, dtype: np.dtype, decoder: str) -> None:
        """Refuse a decoder this graph was not made for: its depth and width, and the key width and
        type of the cells llama.cpp saved for it (``saved``, cache type ``dtype``)."""
        if (self.n_layer, self.hidden_size) != (n_layer, n_embd):
            raise CheckpointError(f"{self.path}: a prompt graph of {self.n_layer} layers x {self.hidden_size} for a decoder of "
                                  f"{n_layer} x {n_embd} ({decoder})")
        if saved.k.shape[::2] != (n_layer, self.kv_dim) or saved.k.dtype != dtype:
            raise CheckpointError(f"{self.path}: keys of {self.kv_dim} values per position; {decoder} caches "
                                  f"{saved.k.shape[-1]} ({saved.k.dtype})")

    def cells(self, rows: np.ndarray, past: SequenceKV | None, dtype: np.dtype, *, v_trans: bool) -> SequenceKV:
        """The KV cells of positions ``0..`` through ``rows``: ``past`` (the cached positions before
        them, none for a prompt from position 0) followed by the rows' own, in the cache's ``dtype``."""
        start = past.n_cells if past is not None else 0
        if past is not None and not np.array_equal(past.positions, np.arange(start)):
            raise MdlEdgeError(f"the KV cache holds positions {past.positions[:8].tolist()}..., not 0..{start - 1}")
        k, v = self.run(rows, start, past.k, past.v) if past is not None else self.run(rows, 0)
        k, v = k.astype(dtype, copy=False), v.astype(dtype, copy=False)
        if past is not None:
            k, v = np.concatenate([past.k, k], axis=1), np.concatenate([past.v, v], axis=1)
        return SequenceKV(np.arange(start + rows.shape[0], dtype=np.int32), k, v, v_trans)
