"""The artifact contract: the only thing qcn.compile and qcn.runtime share (docs/CONTRACT.md).

- :mod:`.manifest`: manifest.json as typed, versioned, frozen data; ``read_manifest`` (the
  one reader) and ``write_manifest`` (the one writer); unknown keys are errors; a newer
  ``format_version`` is refused naming both versions.
- :mod:`.dtypes`: the dtype names a manifest may use and what ONNX, ONNX Runtime, TensorRT,
  numpy and torch call them (one table).
- :mod:`.hashing`: sha256 of files, bytes and JSON values; the ``files`` section.
- :mod:`.engine_header`: what can be read from a TensorRT-RTX engine without a GPU.

Imports only numpy and the standard library, so the runtime-only install can use it.
"""

from ..errors import ArtifactError
from .dtypes import DTYPES, DType, dtype, from_onnx, from_ort, from_trt, numpy_dtype
from .engine_header import EngineHeader, parse_header
from .hashing import hash_files, is_sha256, sha256_bytes, sha256_file, sha256_json
from .manifest import (CACHE_KINDS, CARRIED_KINDS, FORMAT, FORMAT_VERSION, GRAPH_NAMES, LOGITS_MODES,
                       MANIFEST_NAME, STAGES, STATE_KINDS, SUPPORTED_FORMAT_VERSIONS, UPGRADES, BuildSection,
                       CheckpointInfo, GenerationDefaults, GraphSpec, Manifest, ModelSpec, NetworkIO,
                       OnnxSource, PassesSection, ProfileSpec, RuntimeSpec, ShapeRange, SpeculativeSection, StateSpec,
                       TensorSpec, TokenizerSpec,
                       manifest_from_json, manifest_to_json, read_manifest, write_manifest)
from .schema import from_json, to_json

__all__ = [
    "ArtifactError",
    "DTYPES", "DType", "dtype", "from_onnx", "from_ort", "from_trt", "numpy_dtype",
    "EngineHeader", "parse_header",
    "hash_files", "is_sha256", "sha256_bytes", "sha256_file", "sha256_json",
    "CACHE_KINDS", "CARRIED_KINDS", "FORMAT", "FORMAT_VERSION", "GRAPH_NAMES", "LOGITS_MODES", "MANIFEST_NAME",
    "STAGES", "STATE_KINDS", "SUPPORTED_FORMAT_VERSIONS", "UPGRADES", "BuildSection", "CheckpointInfo",
    "GenerationDefaults", "GraphSpec", "Manifest", "ModelSpec", "NetworkIO", "OnnxSource", "PassesSection", "ProfileSpec",
    "RuntimeSpec", "ShapeRange", "SpeculativeSection", "StateSpec", "TensorSpec", "TokenizerSpec", "manifest_from_json",
    "manifest_to_json", "read_manifest", "write_manifest", "from_json", "to_json",
]
