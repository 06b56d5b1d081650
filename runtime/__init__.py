"""mdl-edge runtime: torch-free inference pieces (audio, prompt, configuration, CLI)."""

from __future__ import annotations

import logging

__all__ = ["logger"]

#: The one logger of the project; library code never configures logging itself.
logger = logging.getLogger("mdl_edge")
logger.addHandler(logging.NullHandler())
