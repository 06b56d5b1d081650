"""This machine's own limits, measured in the same run as a benchmark: fp32 and int8 matrix-product
rates (ONNX Runtime's MLAS kernels, the ones the encoder runs on, weights prepacked as the
encoder's are) and memory read bandwidth. The machines we run on change from day to day; a stage's
time is only comparable across them as a fraction of the rate that bounds it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import numpy as np

from ...runtime.cpu import CpuInfo, cpu_info
from ...runtime.kv_state import KV_CACHE_DTYPE

GEMM_N = 2048  # square side: large enough that the kernels, not the edges, set the rate
READ_BYTES = 1 << 30  # well beyond any last-level cache
T = TypeVar("T")


@dataclass(frozen=True)
class MachinePeaks:
    """Measured rates: fp32 GFLOP/s, int8 GOP/s (multiply-adds count 2), read GB/s."""

    cpu: CpuInfo
    threads: int
    fp32_gflops: float
    int8_gops: float
    read_gbs: float
    samples: int = 1  # measurements these rates are the highest of

    def higher(self, other: MachinePeaks) -> MachinePeaks:
        """Each rate the higher of two measurements. A benchmark measures before and after its
        runs: the host's speed moves during a run (shared machines), and a stage's fraction of a
        rate read low would flatter the stage."""
        return replace(self, fp32_gflops=max(self.fp32_gflops, other.fp32_gflops), int8_gops=max(self.int8_gops, other.int8_gops),
                       read_gbs=max(self.read_gbs, other.read_gbs), samples=self.samples + other.samples)

    def header(self) -> str:
        when = f" (each the highest of {self.samples} measurements, before and after the runs)" if self.samples > 1 else ""
        return (f"CPU: {self.cpu.describe()}\n"
                f"measured here, {self.threads} threads{when}: fp32 GEMM {self.fp32_gflops:.0f} GFLOP/s, int8 GEMM {self.int8_gops:.0f} GOP/s "
                f"(ONNX Runtime MatMul / MatMulInteger, {GEMM_N}^3), memory read {self.read_gbs:.1f} GB/s")


def best_of(fn: Callable[[], object], repeats: int, *, warmup: bool = True) -> float:
    """Best wall time of ``repeats`` calls (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_of_interleaved(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = True) -> dict[str, float]:
    """:func:`best_of` for several functions called in turn, so that a change in the host's speed
    hits them all alike: each one's best wall time of ``repeats`` calls."""
    if warmup:
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _gemm_session(int8: bool, threads: int):  # noqa: ANN202 (an onnxruntime session)
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n = GEMM_N
    if int8:
        w = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w")
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_type = y_type = TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", x_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def gemm_rate(int8: bool, threads: int, repeats: int = 3) -> float:
    """Giga-operations per second of an ``N x N x N`` product (2 per multiply-add)."""
    sess = _gemm_session(int8, threads)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (GEMM_N, GEMM_N), dtype=np.uint8) if int8 else rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
    s = best_of(lambda: sess.run(None, {"x": x}), repeats)
    return 2 * GEMM_N**3 / s / 1e9


def read_bandwidth(threads: int, repeats: int = 3) -> float:
    """GB/s of summing a 1 GiB array, split between ``threads`` threads (numpy releases the GIL)."""
    data = np.ones(READ_BYTES // 4, np.float32)
    parts = np.array_split(data, threads)
    with ThreadPoolExecutor(threads) as pool:
        s = best_of(lambda: list(pool.map(np.add.reduce, parts)), repeats)
    return READ_BYTES / s / 1e9


def measure(threads: int) -> MachinePeaks:
    """All three rates at ``threads`` threads (a few seconds)."""
    return MachinePeaks(cpu_info(), threads, gemm_rate(False, threads), gemm_rate(True, threads), read_bandwidth(threads))


def measure_around(threads: int, run: Callable[[], T]) -> tuple[T, MachinePeaks]:
    """``run()``'s result, and the rates measured before and after it (the higher of each)."""
    before = measure(threads)
    result = run()
    return result, before.higher(measure(threads))


def encoder_flops(embed_dim: int, depth: int, mlp_dim: int, patches: list[int], *, acoustic_mels: int = 0) -> float:
    """Operations (2 per multiply-add) of the encoder over chunks of ``patches`` patches each:
    patch embedding (and the acoustic one of a DashengTokenizer-style encoder), QKV, attention
    scores and values, output projection, MLP."""
    d = embed_dim
    total = 0.0
    for n in patches:
        block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp_dim
        total += depth * block + 2 * n * 256 * d + 2 * n * 4 * acoustic_mels * d
    return total


@dataclass(frozen=True)
class DecoderCost:
    """A GGUF decoder's work: operations per prompt position (the weight matrices of the layers,
    2 per multiply-add; the output matrix runs for the last position only), bytes of weights
    read per generated token (every layer's, and the output matrix, whose own share is
    ``output_bytes``), and bytes of the default f16 KV cache per cached position, which every
    generated token reads too (``kv_bytes_per_position``)."""

    flops_per_position: float
    bytes_per_token: float
    output_bytes: float = 0.0
    kv_bytes_per_position: float = 0.0

    def bytes_read(self, cached: float) -> float:
        """Bytes one generated token reads with ``cached`` positions in the KV cache: the weights
        and those positions' keys and values."""
        return self.bytes_per_token + self.kv_bytes_per_position * cached


#: bytes per element of the KV cache as the runtime keeps it by default
KV_ELEMENT_BYTES = KV_CACHE_DTYPE.itemsize


def decoder_cost(path: str) -> DecoderCost:
    from ...runtime.gguf_meta import TENSOR_BLOCKS, TOKEN_EMBD, read_gguf_header

    tensors = read_gguf_header(path).tensors
    output = "output.weight" if "output.weight" in tensors else TOKEN_EMBD  # tied: the table is also the output matrix
    n_embd = tensors[TOKEN_EMBD].shape[0]
    flops = 0.0
    read = 0.0
    output_bytes = 0.0
    kv_width = 0.0
    for name, info in tensors.items():
        n = float(np.prod(info.shape, dtype=np.float64))
        block, block_bytes = TENSOR_BLOCKS.get(info.ggml_type, (1, 4))
        size = n / block * block_bytes
        if name.endswith((".attn_k.weight", ".attn_v.weight")):
            kv_width += n / n_embd  # each layer's key (value) width: heads x head size
        if name == output:
            output_bytes = size
        elif name == TOKEN_EMBD:
            continue  # an input lookup: one row a token
        elif len(info.shape) == 2:
            flops += 2 * n
        read += size
    return DecoderCost(flops, read, output_bytes, kv_width * KV_ELEMENT_BYTES)
