"""mdl-edge runtime: torch-free inference pieces (audio, mel, encoder, prompt, decoder, pipeline, CLI)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

__all__ = ["logger", "quiet_third_party"]

#: The one logger of the project; library code never configures logging itself.
logger = logging.getLogger("mdl_edge")
logger.addHandler(logging.NullHandler())


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence the exporters' and quantizers' routine chatter for the duration (torch.onnx's
    missing-torchvision notes and deprecation warnings, onnxruntime's pre-processing advice on
    the root logger); errors still raise. Our own progress goes through the mdl_edge logger."""

    class DropAdvice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    advice = DropAdvice()
    root = logging.getLogger()
    torch_log.setLevel(logging.ERROR)
    root.addFilter(advice)
    for h in root.handlers:
        h.addFilter(advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch_log.setLevel(level)
        root.removeFilter(advice)
        for h in root.handlers:
            h.removeFilter(advice)
