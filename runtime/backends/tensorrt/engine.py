"""The engine against the manifest: the `build` section as typed data (`EngineInfo`) and
`verify_engine`, which refuses a missing, truncated, modified or foreign-version engine before
any TensorRT module is asked to deserialize it. Pure Python: tested without a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from qcn.artifact import EngineHeader, parse_header, sha256_bytes

from ...errors import ArtifactError
from ...manifest import Manifest

__all__ = ["Profile", "EngineInfo", "verify_engine"]


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
    header: EngineHeader | None
    profiles: tuple[Profile, ...]
    graph_profile: Mapping[str, int]
    runtime_cache: str | None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "EngineInfo":
        """From the typed `build` section. The contract's reader has already checked it (module,
        a profile per graph, every graph's file is the engine)."""
        where = manifest.artifact_dir / "manifest.json"
        b = manifest.build
        if manifest.stage != "build" or b is None:
            raise ArtifactError(f"{where}: stage {manifest.stage!r} has no TensorRT engine; the tensorrt backend runs "
                                "build-stage artifacts (qcn-compile RECIPE with a GPU target)")
        profiles = tuple(Profile(p.name, p.index, p.graphs, {k: (r.min, r.opt, r.max) for k, r in p.shapes.items()})
                         for p in b.profiles)
        return cls(module=b.module, module_version=b.module_version, engine=b.engine, engine_bytes=b.engine_bytes,
                   engine_sha256=b.engine_sha256, header=b.engine_header, profiles=profiles,
                   graph_profile=b.graph_profile, runtime_cache=b.runtime_cache)


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
    if info.engine_sha256 and sha256_bytes(data) != info.engine_sha256:
        raise ArtifactError(f"{path}: sha256 differs from manifest build.engine_sha256; rebuild it")
    if info.module == "tensorrt_rtx":
        header = parse_header(data)
        if header is None:
            raise ArtifactError(f"{path}: not a TensorRT-RTX engine (no 'vtrt' header)")
        if header.size != len(data):
            raise ArtifactError(f"{path}: header says {header.size} bytes, file has {len(data)} (truncated)")
        if info.header and info.header != header:
            raise ArtifactError(f"{path}: header {header.to_dict()} does not match manifest build.engine_header "
                                f"{info.header.to_dict()}")
        if not info.module_version.startswith(header.version):
            raise ArtifactError(f"{path}: built by TensorRT-RTX {header.version}, manifest says {info.module_version}")
    if installed_version is not None and installed_version != info.module_version:
        raise ArtifactError(f"{path}: built with {info.module} {info.module_version}, installed is {installed_version}; "
                            f"engines load only in the version that built them: rebuild (qcn-compile) or install "
                            f"{info.module}=={info.module_version}")
    return info
