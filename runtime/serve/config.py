"""The server's settings: one frozen, typed value built in one place (the CLI or a test)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RequestError

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """How ``qcn-serve`` runs.

    - ``max_batch``: sequence slots decoded together (None = the manifest's runtime.max_batch).
    - ``queue_size``: requests that may wait for a slot; one more gets HTTP 429.
    - ``api_key``: when set, every ``/v1/*`` request needs ``Authorization: Bearer <key>``.
    - ``prefix_cache_bytes``: memory for kept multi-turn states (0 = no state reuse).
    - ``model_name``: the id ``/v1/models`` lists and requests must name (None = the artifact
      directory's name).
    """

    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    queue_size: int = 64
    max_batch: int | None = None
    max_context: int | None = None
    threads: int | None = None
    prefix_cache_bytes: int = 1 << 30
    model_name: str | None = None
    verify_hashes: bool = True

    def __post_init__(self):
        object.__setattr__(self, "artifact", Path(os.fspath(self.artifact)))
        for name in ("port", "queue_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "port" else 0) or (name == "port" and v > 65535):
                valid = "1..65535" if name == "port" else "an integer >= 0"
                raise RequestError(f"{name} must be {valid}, got {v!r}")
        for name in ("max_batch", "max_context", "threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(f"{name} must be a positive integer or unset, got {v!r}")
        if isinstance(self.prefix_cache_bytes, bool) or not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise RequestError(f"prefix_cache_bytes must be an integer >= 0 (0 = off), got {self.prefix_cache_bytes!r}")
        if self.api_key is not None and not self.api_key:
            raise RequestError("api_key must be a non-empty string or unset")

    @property
    def served_name(self) -> str:
        return self.model_name or self.artifact.resolve().name
