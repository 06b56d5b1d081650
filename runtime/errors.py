"""The project's exceptions: each names the file or value at fault and what is wrong with it.

The command line maps them to exit codes: a :class:`ConfigError` (the command line or an option
asks for something impossible) exits 2 like a usage error; every other :class:`MdlEdgeError` (a
file is missing, corrupt or does not belong) exits 1.
"""

from __future__ import annotations


class MdlEdgeError(Exception):
    """Base class of every error mdl-edge raises on purpose."""


class ConfigError(MdlEdgeError, ValueError):
    """A config.json (or an option) is missing a key or has a key of the wrong type or value."""


class OptionError(ConfigError):
    """An option given by the caller is invalid; ``option`` is its keyword name (e.g.
    ``"max_new_tokens"``), which the command line maps to its flag."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.detail = message


class ContextLengthError(ConfigError):
    """A request needs more decoder positions (prompt, new tokens) than the context holds."""


class CheckpointError(MdlEdgeError):
    """A model folder lacks files, or its tensors are missing, unexpected or mis-shaped."""


class AudioError(MdlEdgeError, ValueError):
    """Audio that cannot be read or used: corrupt, empty, non-finite, wrong shape or rate."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (third-party messages often span several)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
