"""sha256 helpers: the one copy that the compile stages, the runtime and the tests use."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

__all__ = ["sha256_file", "sha256_bytes", "sha256_json", "hash_files", "is_sha256"]

_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike, chunk: int = _CHUNK, progress=None) -> str:
    """Lowercase hex sha256 of a file, read in chunks (weights files are large); ``progress``
    (a tqdm bar, or anything with ``update(n)``) is advanced by the bytes read. OSError propagates."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress.update(len(block))
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    """sha256 of a JSON value in canonical form (sorted keys): a key for "same inputs"."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def hash_files(directory: str | os.PathLike, exclude: tuple[str, ...] = ("manifest.json",), *,
               hasher: Callable[[Path], str] = sha256_file) -> dict[str, str]:
    """{name: sha256} of every regular file directly in ``directory`` (sorted), except ``exclude``:
    the manifest's ``files`` section. ``hasher``: e.g. a cache's ``sha256`` (default: read every file)."""
    d = Path(directory)
    return {p.name: hasher(p) for p in sorted(d.iterdir()) if p.is_file() and p.name not in exclude}


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
