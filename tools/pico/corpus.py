"""The qcn-pico corpus: this Python's standard library `.py` files, split by file.

Split rule (fixed, documented in models/qcn-pico/README.md): a file is held out when the first
four bytes of sha256(its path relative to the stdlib, POSIX form, UTF-8), read big-endian, are
0 modulo HELDOUT_MODULUS. Everything else is train. site-packages is excluded, and so are files
that are not valid UTF-8 (a handful of encoding tests). Files are read in sorted path order, and
each is followed by <|endoftext|> in the token stream.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_MODULUS = 32  # ~3% of files


@dataclass(frozen=True)
class SourceFile:
    rel: str  # POSIX path relative to the stdlib root
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: str) -> str:
    """'heldout' or 'train' for a stdlib-relative POSIX path (the fixed hash rule)."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:4], "big")
    return "heldout" if h % HELDOUT_MODULUS == 0 else "train"


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """Every UTF-8 `.py` file under the stdlib root except site-packages, in sorted order."""
    root = root or stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/", 1)[0] == "site-packages" or not p.is_file():
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append(SourceFile(rel, text))
    if not out:
        raise RuntimeError(f"no .py files found under {root}")
    return out


def split(files: list[SourceFile]) -> dict[str, list[SourceFile]]:
    parts: dict[str, list[SourceFile]] = {"train": [], "heldout": []}
    for f in files:
        parts[split_of(f.rel)].append(f)
    return parts


def manifest_digest(files: list[SourceFile]) -> str:
    """sha256 over (path, content) of the files, so a card can name the exact corpus."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.rel.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(f.text.encode()).digest())
    return h.hexdigest()
