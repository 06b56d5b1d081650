"""Metadata that travels inside our ONNX files, and reading it back (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ENCODER_FILE = "encoder.onnx"
PROJECTOR_FILE = "projector.onnx"
META_KEY = "mdl_edge"


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Store ``meta`` as JSON under the ``mdl_edge`` metadata prop of an ONNX file (graph only;
    the external data file is untouched)."""
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
    from .errors import CheckpointError

    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not an mdl-edge ONNX file (no '{META_KEY}' metadata)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt mdl-edge metadata: {e}") from e
