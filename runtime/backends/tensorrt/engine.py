"""The engine against the manifest: the `build` section as typed data (`EngineInfo`) and
`verify_engine`, which refuses a missing, truncated, modified or foreign-version engine before
any TensorRT module is asked to deserialize it. Pure Python: tested without a GPU."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import ArtifactError
from ...manifest import Manifest

__all__ = ["Profile", "EngineInfo", "verify_engine", "parse_engine_header"]

_MAGIC = b"vtrt"
_CC_BITS = {"7.5": 1, "8.0": 2, "8.6": 4, "8.9": 8, "12.0": 16, "12.1": 32}


def parse_engine_header(data: bytes) -> dict | None:
    """TensorRT-RTX engine header (layout read off 1.7.1 engines; see compile/build/engine_header.py)."""
    if len(data) < 64 or data[:4] != _MAGIC:
        return None
    mask = struct.unpack_from("<I", data, 32)[0]
    return {"size": struct.unpack_from("<Q", data, 16)[0], "version": f"{data[24]}.{data[25]}.{data[26]}",
            "compute_capabilities": [cc for cc, bit in _CC_BITS.items() if mask & bit]}


@dataclass(frozen=True)
class Profile:
    name: str
    index: int
    graphs: tuple[str, ...]
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class EngineInfo:
    """The manifest's `build` section, checked."""

    module: str
    module_version: str
    engine: str
    engine_bytes: int
    engine_sha256: str | None
    header: Mapping[str, Any] | None
    profiles: tuple[Profile, ...]
    graph_profile: Mapping[str, int]
    runtime_cache: str | None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "EngineInfo":
        where = manifest.artifact_dir / "manifest.json"
        b = manifest.raw.get("build")
        if manifest.stage != "build" or not isinstance(b, Mapping):
            raise ArtifactError(f"{where}: stage {manifest.stage!r} has no TensorRT engine; the tensorrt backend runs "
                                "build-stage artifacts (qcn-compile RECIPE with a GPU target)")
        try:
            profiles = tuple(Profile(p["name"], int(p["index"]), tuple(p["graphs"]),
                                     {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in p["shapes"].items()})
                             for p in b["profiles"])
            info = cls(module=b["module"], module_version=b["module_version"], engine=b["engine"],
                       engine_bytes=int(b["engine_bytes"]), engine_sha256=b.get("engine_sha256"),
                       header=b.get("engine_header"), profiles=profiles, graph_profile=dict(b["graph_profile"]),
                       runtime_cache=b.get("runtime_cache"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: key 'build' is malformed ({type(e).__name__}: {e})") from None
        if info.module not in ("tensorrt", "tensorrt_rtx"):
            raise ArtifactError(f"{where}: build.module {info.module!r} is not tensorrt or tensorrt_rtx")
        for g in manifest.graphs:
            if g not in info.graph_profile:
                raise ArtifactError(f"{where}: build.graph_profile has no profile for graph {g!r}")
            if manifest.graphs[g].file != info.engine:
                raise ArtifactError(f"{where}: graphs.{g}.file {manifest.graphs[g].file!r} is not the engine {info.engine!r}")
        return info


def verify_engine(manifest: Manifest, installed_version: str | None, data: bytes | None = None) -> EngineInfo:
    """Refuse an engine that is missing, truncated, modified, or from another TensorRT version
    than `installed_version` (the importable module's __version__; None = not checked)."""
    info = EngineInfo.from_manifest(manifest)
    path = manifest.artifact_dir / info.engine
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read the engine: {e.strerror or e}") from None
    if len(data) != info.engine_bytes:
        raise ArtifactError(f"{path}: {len(data)} bytes, the manifest says {info.engine_bytes} "
                            f"({'truncated' if len(data) < info.engine_bytes else 'changed'}); rebuild it")
    if info.engine_sha256 and hashlib.sha256(data).hexdigest() != info.engine_sha256:
        raise ArtifactError(f"{path}: sha256 differs from manifest build.engine_sha256; rebuild it")
    if info.module == "tensorrt_rtx":
        header = parse_engine_header(data)
        if header is None:
            raise ArtifactError(f"{path}: not a TensorRT-RTX engine (no 'vtrt' header)")
        if header["size"] != len(data):
            raise ArtifactError(f"{path}: header says {header['size']} bytes, file has {len(data)} (truncated)")
        if info.header and dict(info.header) != header:
            raise ArtifactError(f"{path}: header {header} does not match manifest build.engine_header {dict(info.header)}")
        if not info.module_version.startswith(header["version"]):
            raise ArtifactError(f"{path}: built by TensorRT-RTX {header['version']}, manifest says {info.module_version}")
    if installed_version is not None and installed_version != info.module_version:
        raise ArtifactError(f"{path}: built with {info.module} {info.module_version}, installed is {installed_version}; "
                            f"engines load only in the version that built them: rebuild (qcn-compile) or install "
                            f"{info.module}=={info.module_version}")
    return info
