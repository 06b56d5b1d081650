"""The ONNX files as mdl-edge writes and reads them: file names, and the JSON metadata that
travels inside each graph under the ``mdl_edge`` metadata prop.

Writing and reading a file on disk need the ``onnx`` package (export extra); reading a loaded
onnxruntime session's metadata (what the runtime does) does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError, one_line

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
