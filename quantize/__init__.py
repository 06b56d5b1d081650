"""mdl-edge quantize: quantized encoder (int8 ONNX) and decoder (GGUF k-quant) variants, with their measured cost."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def writing_into(folder: Path) -> Iterator[None]:
    """Run ONNX Runtime's quantizer with ``folder`` (where its output goes) as the working
    directory. onnx's external-data writer checks the data file's name against the current
    directory, not the output's, so a file of that name where the command runs (an older
    bundle's ``encoder.int8.onnx.data``) failed the export with ``FileExistsError``. Paths
    handed to the quantizer inside must be absolute."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
