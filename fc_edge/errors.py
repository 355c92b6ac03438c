"""Named exceptions for mistakes a user (or a peer on the wire) can cause.

The CLI catches :class:`FcEdgeError` and prints its message on one line; anything else is a bug.
"""

from __future__ import annotations


class FcEdgeError(Exception):
    """Base of every error fc-edge raises on purpose."""


class ConfigError(FcEdgeError, ValueError):
    """A parameter, flag or input is invalid: the message says which and what to do."""


class BudgetError(ConfigError):
    """A codec cannot meet the requested byte budget for this shape (e.g. ratio too high)."""


class NonFiniteError(ConfigError):
    """An activation given to a codec holds NaN or Inf (or values a codec's arithmetic would
    overflow to them): nothing is encoded. A server maps it to INVALID_ARGUMENT."""


class WireError(FcEdgeError, ValueError):
    """A byte string is not a valid fc-edge payload (truncated, corrupt, oversized, unknown)."""


class ModelError(FcEdgeError):
    """A model cannot be found, loaded or split (missing package, bad path, unsupported family)."""
