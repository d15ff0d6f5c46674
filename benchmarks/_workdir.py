"""The scratch folder of a benchmark that writes and deletes large files: it is the benchmark's
own only when the benchmark created it (a marker file inside says so) or it is empty. A
user's folder passed by mistake is refused with one line, never emptied."""

from __future__ import annotations

from pathlib import Path

MARKER = ".qcn-benchmark-workdir"


def own_workdir(path: Path, flag: str) -> Path:
    """Create ``path`` (or accept it when it is empty or was made by a qcn benchmark) and mark it."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SystemExit(f"{flag} {path}: is a file; give a new or empty folder (the benchmark deletes what it writes there)")
        entries = [p.name for p in path.iterdir()]
        if entries and MARKER not in entries:
            raise SystemExit(f"{flag} {path}: holds {len(entries)} entries that no qcn benchmark wrote "
                             f"(e.g. {sorted(entries)[0]!r}); give a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path
