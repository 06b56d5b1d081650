"""What this CPU is, and what follows from it: its model name and SIMD features (benchmark tables
name them, because the machines we run on change from day to day), and whether ONNX Runtime's
fast int8 matrix product can saturate here.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The SIMD features that decide which kernels run, in the order a table lists them.
SIMD_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",  # x86
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16",  # arm64 (Linux names: dotprod is "asimddp")
)
# With VNNI (or AMX) ONNX Runtime's u8 x s8 int8 kernels add products in 32 bits; without it, on
# x86-64, they use AVX2's vpmaddubsw, which adds pairs of u8 x s8 products in saturating 16-bit
# lanes (ORT: session option "session.x64quantprecision").
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, architecture and the :data:`SIMD_FEATURES` it reports."""

    model: str
    machine: str
    features: tuple[str, ...]

    @property
    def int8_saturates(self) -> bool:
        """Whether ONNX Runtime's default int8 MatMul (u8 activations x s8 weights) can saturate
        its 16-bit intermediate sums on this CPU: x86-64 without VNNI."""
        return self._x86 and not self.fast_int8

    @property
    def fast_int8(self) -> bool:
        """Whether the CPU has int8 dot-product instructions (x86-64 VNNI or AMX, arm64 dotprod),
        with which ONNX Runtime's int8 MatMul outruns its fp32 one; on a 2-core AVX2-only EPYC it
        measured 73 GOP/s against 68 GFLOP/s in fp32."""
        if self._x86:
            return any(f in self.features for f in _VNNI)
        return "asimddp" in self.features or "i8mm" in self.features

    @property
    def _x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "amd64")

    def describe(self) -> str:
        """One line for a table header: ``model (machine; features)``."""
        return f"{self.model} ({self.machine}; {' '.join(self.features) or 'no SIMD flags reported'})"


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (x86 ``flags``, arm64 ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(model or platform.processor() or "unknown CPU", machine, tuple(f for f in SIMD_FEATURES if f in flags))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (Linux: from ``/proc/cpuinfo``; elsewhere only the architecture)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())
