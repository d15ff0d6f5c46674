"""manifest.json: the only thing the runtime knows about a compiled model (docs/CONTRACT.md).

The contract itself (typed sections, the one reader, versioning, dtype names, hashing) lives in
:mod:`qcn.artifact`, which qcn.compile writes through; this module is the runtime's name for it.
``load_manifest(artifact_dir)`` parses and validates the manifest into frozen dataclasses;
the sha256 of the listed files is checked lazily by :meth:`Manifest.verify_files` (weights are
large); every backend calls it before it opens its first session, and ``verify_hashes=False``
opts out.
"""

from __future__ import annotations

from qcn.artifact.dtypes import numpy_dtype
from qcn.artifact.manifest import (CACHE_KINDS, CARRIED_KINDS, FORMAT, LOGITS_MODES, MANIFEST_NAME, STATE_KINDS,
                                   SUPPORTED_FORMAT_VERSIONS, BuildSection, GenerationDefaults, GraphSpec, Manifest,
                                   ModelSpec, RuntimeSpec, StateSpec, TensorSpec, TokenizerSpec)
from qcn.artifact.manifest import read_manifest as load_manifest

SUPPORTED_FORMAT = FORMAT

__all__ = [
    "MANIFEST_NAME", "SUPPORTED_FORMAT", "SUPPORTED_FORMAT_VERSIONS", "STATE_KINDS", "CARRIED_KINDS",
    "CACHE_KINDS", "LOGITS_MODES", "TensorSpec", "GraphSpec", "StateSpec", "TokenizerSpec", "GenerationDefaults",
    "ModelSpec", "RuntimeSpec", "BuildSection", "Manifest", "load_manifest", "numpy_dtype",
]
