"""The one exception family of nano.

Every error a user can cause (a bad file, a wrong setting, an impossible request) is a ``NanoError``
whose message says what is wrong and what to do. The CLI prints it on one line and exits with
code 2; library callers can catch ``NanoError`` (or the ``ValueError`` / ``OSError`` it also is).
"""

from __future__ import annotations


class NanoError(Exception):
    """Base class: a user-facing error with a one-line, actionable message."""

    exit_code = 2


class ConfigError(NanoError, ValueError):
    """An invalid model configuration (``config.json`` or a profile); the message names the field."""


class CheckpointError(NanoError, ValueError):
    """A checkpoint directory or safetensors file that cannot be used as it is."""


class CacheError(NanoError, ValueError):
    """A generation cache used beyond what it was allocated for."""


class GenerationError(NanoError, ValueError):
    """An invalid generation request: a sampling value out of range, an empty prompt, too long a context."""


class TokenizerError(NanoError, ValueError):
    """A tokenizer directory, special token or chat template that cannot be used as it is."""
