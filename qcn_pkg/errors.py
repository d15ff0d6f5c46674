"""The one base class of every error qcn raises on purpose, shared by `qcn.compile` and `qcn.runtime`.

A `QcnError` means "the input (recipe, checkpoint, artifact, request, output path) is wrong":
the CLIs print its message as one line and exit 2. Any other exception reaching a CLI is a bug
and keeps its traceback. `ArtifactError` is here too because the artifact contract
(`qcn.artifact`), which both packages import, raises it; `qcn.runtime.errors` re-exports both.
"""

from __future__ import annotations

__all__ = ["QcnError", "ArtifactError"]


class QcnError(Exception):
    """Base class of every error raised on purpose by qcn (compile and runtime)."""


class ArtifactError(QcnError):
    """An artifact directory or its manifest.json is unusable (unknown or newer format_version,
    missing file, hash mismatch, missing, unknown or invalid key, graph I/O that disagrees with
    the manifest)."""
