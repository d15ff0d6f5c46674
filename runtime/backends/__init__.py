"""Backend registry. A backend runs the artifact's graphs (``run(graph_name, feeds) -> dict``)
and creates the state store a Session keeps its sequences in (``create_state``; a backend with
nothing better returns ``qcn.runtime.state.HostStateStore(self, ...)``).

The manifest's ``runtime.backend`` names the backend. Backends are registered by name with an
import path and imported only when used, so a missing optional dependency of one backend does
not break the others.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import BackendError
from ..state import StateStore

__all__ = ["Backend", "register_backend", "available_backends", "get_backend_class", "create_backend"]


@runtime_checkable
class Backend(Protocol):
    """What Session needs from a backend."""

    manifest: Any

    def run(self, graph_name: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``graph_name`` ("prefill" | "decode"); return every output by name."""
        ...

    def create_state(self, *, slots: int, max_context: int) -> StateStore:
        """A state store for ``slots`` sequences of up to ``max_context`` tokens."""
        ...

    def close(self) -> None: ...


# name -> "module:attribute" (lazy) or a factory callable
_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "onnxruntime": "qcn.runtime.backends.onnxruntime:OrtBackend",
    "tensorrt": "qcn.runtime.backends.tensorrt:TensorRTBackend",  # needs a CUDA GPU + tensorrt / tensorrt_rtx
}


def register_backend(name: str, factory: str | Callable[..., Backend]) -> None:
    """Register ``factory(manifest, artifact_dir, **options)`` (or a "module:attr" path) as ``name``."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend_class(name: str) -> Callable[..., Backend]:
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r} (manifest runtime.backend); available backends: {', '.join(available_backends())}"
        ) from None
    if isinstance(entry, str):
        mod, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(mod), attr)
        except ImportError as e:
            raise BackendError(f"backend {name!r} is registered but cannot be imported: {e}") from None
        _REGISTRY[name] = entry
    return entry


def create_backend(manifest, artifact_dir=None, *, backend: str | None = None, **options) -> Backend:
    """Open the backend named by ``backend`` or else the manifest's ``runtime.backend``."""
    name = backend or manifest.runtime.backend
    cls = get_backend_class(name)
    return cls(manifest, artifact_dir if artifact_dir is not None else manifest.artifact_dir, **options)
