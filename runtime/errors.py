"""The project's exceptions: each names the file or value at fault and what is wrong with it."""

from __future__ import annotations


class MdlEdgeError(Exception):
    """Base class of every error mdl-edge raises on purpose."""


class ConfigError(MdlEdgeError, ValueError):
    """A config.json (or an option) is missing a key or has a key of the wrong type or value."""


class CheckpointError(MdlEdgeError):
    """A model folder lacks files, or its tensors are missing, unexpected or mis-shaped."""


class AudioError(MdlEdgeError, ValueError):
    """Audio that cannot be read or used: corrupt, empty, non-finite, wrong shape or rate."""
