"""mdl-edge: MiDashengLM (audio captioning, speech recognition, audio question answering) on a CPU.

``from mdl_edge import AudioLM`` is the entry point; the pieces live in ``mdl_edge.runtime``
(torch-free), ``mdl_edge.export`` and ``mdl_edge.quantize`` (export extra). Names here are
imported on first use, so ``import mdl_edge`` loads nothing heavy.

(Installed as ``mdl_edge/__init__.py`` by ``cpp_ext/CMakeLists.txt``: the top-level folders
are the package's subpackages, so the package itself has no folder of its own.)
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AudioLM": "mdl_edge.runtime.pipeline",
    "Request": "mdl_edge.runtime.pipeline",
    "Result": "mdl_edge.runtime.pipeline",
    "SegmentOptions": "mdl_edge.runtime.segments",
    "TimedSegment": "mdl_edge.runtime.segments",
    "LiveSession": "mdl_edge.runtime.live",
    "LiveOptions": "mdl_edge.runtime.live",
    "LiveEvent": "mdl_edge.runtime.live",
    "EncoderOptions": "mdl_edge.runtime.options",
    "DecoderOptions": "mdl_edge.runtime.options",
    "GenerationOptions": "mdl_edge.runtime.options",
    "SamplingOptions": "mdl_edge.runtime.options",
    "MdlEdgeError": "mdl_edge.runtime.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mdl_edge' has no attribute {name!r}")
