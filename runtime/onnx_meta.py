"""The ONNX files as mdl-edge writes and reads them: file names, the JSON metadata that travels
inside each graph under the ``mdl_edge`` metadata prop, and the ONNX Runtime session every graph
of the runtime (encoder, projector, prompt engine) is opened with.

Writing and reading a file on disk need the ``onnx`` package (export extra); reading a loaded
onnxruntime session's metadata (what the runtime does) does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import constants as C
from .errors import CheckpointError, ConfigError, OptionError, one_line

ENCODER_FILE = "encoder.onnx"
PROJECTOR_FILE = "projector.onnx"
PREFILL_FILE = "prefill.int8.onnx"  # the prompt engine (runtime/prefill.py), int8 only in a bundle
META_KEY = "mdl_edge"
# The name of the encoder graph's dynamic time axis (mel frames, a multiple of 4 up to 1008): a
# partial chunk runs at its own length; a static-shape backend pins it to 1008.
FRAMES_AXIS = "frames"


def _parse(raw: str | None, path: Path) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(f"{path}: not an mdl-edge ONNX file (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt mdl-edge metadata: {one_line(e)}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt mdl-edge metadata (a JSON {type(meta).__name__}, not an object)")
    return meta


def model_metadata(model: Any, path: str | Path) -> dict[str, Any]:
    """The ``mdl_edge`` metadata of a loaded ``onnx.ModelProto`` read from ``path``."""
    return _parse({p.key: p.value for p in model.metadata_props}.get(META_KEY), Path(path))


def read_file_metadata(path: str | Path) -> dict[str, Any]:
    """The ``mdl_edge`` metadata of an ONNX file (reads the graph only, not the weights)."""
    import onnx

    return model_metadata(onnx.load(str(path), load_external_data=False), path)


def write_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Store ``meta`` as the ``mdl_edge`` metadata of an ONNX file, replacing what was there
    (the graph is rewritten; the external data file is untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props[META_KEY] = json.dumps(meta, sort_keys=True)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save_model(model, str(path))


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    """The ``mdl_edge`` metadata of a loaded onnxruntime session."""
    return _parse(session.get_modelmeta().custom_metadata_map.get(META_KEY), path)


# ONNX Runtime's switch from u8 x s8 to u8 x u8 int8 kernels on x86-64 without VNNI (see cpu.py).
PRECISE_INT8_KEY = "session.x64quantprecision"
# Whether a session's idle intra-op threads spin after a run ("0": they sleep at once).
ALLOW_SPINNING_KEY = "session.intra_op.allow_spinning"


def ort_session(path: Path, *, threads: int, provider: str = "cpu", optimized_dir: Path | None = None, static_frames: bool = False,
                precise_int8: bool = False) -> Any:
    """An ONNX Runtime session of ``path`` as mdl-edge runs its graphs (``threads`` intra-op
    threads, all graph optimizations, no memory arena, ORT's own log quiet); load failures name
    the file.
    ORT's idle threads sleep at once after a run instead of spinning.
    Every graph here is followed at once by other work on the same cores (the projector after
    each encoder chunk, the prompt engine and llama.cpp after the projector), and a pool left
    spinning takes a core from it: measured on a 2-core AVX-512 EPYC (0.6B shapes, int8 encoder,
    separate processes, medians of 5), a 30 s clip's encoder stage took 0.35 s with spinning
    sessions against 0.29 s without, and its time to first token 0.75 s against 0.65 s."""
    import onnxruntime as ort

    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    opts = ort.SessionOptions()
    if precise_int8:
        opts.add_session_config_entry(PRECISE_INT8_KEY, "1")
    if static_frames:
        opts.add_free_dimension_override_by_name(FRAMES_AXIS, C.CHUNK_FRAMES)
    opts.add_session_config_entry(ALLOW_SPINNING_KEY, "0")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No arena: a run's intermediates go back to the system, where an arena would keep each
    # session's largest run resident for good (0.6B shapes, 30 s clip: peak RSS 0.07 GB lower,
    # the same speed within run-to-run noise).
    opts.enable_cpu_mem_arena = False
    # Nor a memory pattern: ORT keeps one per input shape it met, and the blocks it plans stay
    # spread over the heap (measured: a second 30 s request rests ~20 MB higher with it).
    opts.enable_mem_pattern = False
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # ORT's own warnings go nowhere unless asked
    if optimized_dir is not None:
        opts.optimized_model_filepath = str(optimized_dir / (path.stem + ".optimized.onnx"))
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("provider 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif provider != "cpu":
        raise OptionError("provider", f"must be 'cpu' or 'cuda', got {provider!r}")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise CheckpointError(f"{path}: onnxruntime cannot load it: {e}") from e
