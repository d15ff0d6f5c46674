"""The one base class of every error qcn raises on purpose, shared by `qcn.compile` and `qcn.runtime`.

A `QcnError` means "the input (recipe, checkpoint, artifact, request, output path) is wrong":
the CLIs print its message as one line and exit 2. Any other exception reaching a CLI is a bug
and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["QcnError"]


class QcnError(Exception):
    """Base class of every error raised on purpose by qcn (compile and runtime)."""
