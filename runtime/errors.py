"""Exceptions raised by qcn.runtime.

Every error the runtime raises on purpose derives from :class:`QcnError` (`qcn.errors`, shared
with `qcn.compile`), so a caller (and the
``qcn-run`` CLI) can tell "the artifact or the request is wrong" from a bug. Messages name the
offending file, key or argument and say what would be valid.
"""

from __future__ import annotations

from qcn.errors import ArtifactError, QcnError  # shared with qcn.compile and the artifact contract

__all__ = [
    "QcnError",
    "ArtifactError",
    "BackendError",
    "RequestError",
    "SamplingParamsError",
    "ContextLengthError",
    "CapacityError",
    "SlotError",
    "TokenizerError",
]


class BackendError(QcnError):
    """No such backend, or a backend failed to run a graph."""


class RequestError(QcnError, ValueError):
    """The request (prompts, parameters, slots) is invalid for this artifact/session."""


class SamplingParamsError(RequestError):
    """A sampling / generation parameter is out of range."""


class ContextLengthError(RequestError):
    """A sequence would not fit in the model's (or the session's) max_context."""


class CapacityError(RequestError):
    """More sequences than the session has slots (runtime.max_batch)."""


class SlotError(RequestError):
    """An unknown or duplicated sequence slot, or a token id outside the vocabulary."""


class TokenizerError(QcnError):
    """A tokenizer is needed but missing, or it cannot encode/decode the input."""
