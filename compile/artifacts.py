"""Output directories, written safely: qcn replaces only what it wrote, through a temporary
directory that is visibly its own, and never leaves one behind.

- `check_output(path)`: an existing `path` may be replaced only when it is a qcn artifact (its
  manifest.json says `"format": "qcn-artifact"`) or an empty directory, or when `force` is set.
  Never replaced, even with `force`: a protected directory (the checkpoint), any directory that
  contains one, the current directory and its ancestors, the home directory.
- `atomic_dir(path)`: yields `.qcn-tmp-<name>-<pid>-<rand>` next to `path` and renames it into
  place when the body finished; on any exception (KeyboardInterrupt and the CLI's SIGTERM
  included) it is removed. A lock file `.qcn-lock-<name>-<pid>-<rand>`, held with `flock` for as
  long as the temporary directory exists, tells a live owner from a killed one: the kernel
  drops the lock when its process dies (SIGKILL too), so `remove_stale` (run by every
  `atomic_dir` in the same parent) removes exactly the directories whose owner is gone.
- `HashCache`: sha256 of files keyed by (path, size, mtime_ns, ctime_ns, device, inode), so an
  unchanged multi-GB checkpoint or artifact is not re-read on every no-op compile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

from qcn.artifact import FORMAT as ARTIFACT_FORMAT  # manifest.json "format" of every directory qcn-compile writes
from qcn.artifact.hashing import sha256_file, sha256_json  # noqa: F401  (re-exported; qcn.artifact has the one copy)

from ..errors import QcnError

log = logging.getLogger(__name__)

TMP_PREFIX, OLD_PREFIX, LOCK_PREFIX = ".qcn-tmp-", ".qcn-old-", ".qcn-lock-"
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class OutputError(QcnError):
    """The output path cannot be written, or holds something qcn will not replace."""


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised like KeyboardInterrupt so that temporary directories are removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # signals caught under interrupt_on_signals(), oldest first


def _interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum, _frame):
    _received.append(signum)
    raise _interrupt(signum)


def _quiet_dropped(unraisable, fallback) -> None:
    """`sys.unraisablehook` under `interrupt_on_signals`: an interrupt of ours that Python dropped
    because the handler ran inside a finalizer (`__del__`, a weakref callback) is not printed
    ("Exception ignored in ..." and a traceback, which a user would see); it stays in
    `_received`, and `raise_if_interrupted` raises it at the next safe point. Anything else goes
    to the hook that was in place. (Delivering it again from here does not work: `os.kill` and
    `_thread.interrupt_main` run the handler inside this hook, and a signal sent later from
    another thread can arrive after the handlers were restored.)"""
    exc = unraisable.exc_value
    if isinstance(exc, (KeyboardInterrupt, Terminated)) and _received:
        return
    fallback(unraisable)


def raise_if_interrupted() -> None:
    """Raise the interrupt of a signal received under `interrupt_on_signals` whose exception a
    finalizer dropped. Every `atomic_dir` calls it before it renames anything into place; long
    loops (the export's weights) call it once per item, so Ctrl-C stops them promptly."""
    if _received:
        raise _interrupt(_received[0])


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While the CLI compiles: SIGINT, SIGTERM and SIGHUP unwind the stack (KeyboardInterrupt /
    `Terminated`), so every `atomic_dir` removes its temporary directory. Python drops an
    exception raised while a finalizer (`__del__`) runs ("Exception ignored in ..."): such a
    signal is kept quiet (`_quiet_dropped`) and raised again by `raise_if_interrupted`, which
    every `atomic_dir` calls before it renames anything into place.
    Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    old = {}
    for s in _SIGNALS:
        h = signal.getsignal(s)
        if h is None or h == signal.SIG_IGN:
            continue  # installed outside Python, or ignored: leave it
        old[s] = signal.signal(s, _on_signal)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: _quiet_dropped(u, hook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, h in old.items():
            signal.signal(s, h)
        _received.clear()


# ---------------------------------------------------------------------------------------
# what is at a path, and may qcn replace it

def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def is_qcn_artifact(path: Path) -> bool:
    """A directory whose manifest.json says qcn wrote it."""
    try:
        m = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == ARTIFACT_FORMAT


def describe(path: Path) -> str:
    """What is at `path`, in words, for an error message."""
    path = Path(path)
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if path.is_dir():
        try:
            names = sorted(p.name for p in path.iterdir())
        except OSError as e:
            return f"a directory qcn cannot list ({e.strerror})"
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        what = "a manifest.json that is not a qcn artifact's" if "manifest.json" in names else "no qcn manifest"
        n = f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"
        return f"a directory holding {n} ({shown}; {human_bytes(_size(path))}) and {what}"
    if path.exists():
        return f"a file ({human_bytes(_size(path))})"
    return "nothing"


def _protected(protect: Iterable[Path]) -> list[tuple[Path, str]]:
    out = [(Path(p).expanduser().resolve(), "the checkpoint directory") for p in protect if p is not None]
    out.append((Path.cwd().resolve(), "the current directory"))
    with contextlib.suppress(RuntimeError, KeyError):  # no home directory (some containers)
        out.append((Path.home().resolve(), "your home directory"))
    return out


def check_output(target: Path, *, force: bool = False, protect: Iterable[Path] = ()) -> None:
    """Raise OutputError unless qcn may write (or replace) `target`. `protect`: directories that
    must survive whatever the flags (the checkpoint)."""
    target = Path(target)
    resolved = target.expanduser().resolve()
    protected = _protected(protect)
    for p, what in protected:
        if resolved == p:
            raise OutputError(f"output {target} is {what} ({p}); qcn never replaces it: choose another output "
                              "directory (--out or the recipe's output)")
    for p, what in protected:
        if resolved in p.parents:
            raise OutputError(f"output {target} contains {what} ({p}); qcn never replaces it: choose another output "
                              "directory (--out or the recipe's output)")
    # the nearest existing ancestor must be a directory qcn can write into
    for parent in target.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputError(f"output {target}: cannot create it, {parent} is {describe(parent)}, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"output {target}: cannot write in {parent} (permission denied)")
            break
    if not (target.exists() or target.is_symlink()) or force:
        return
    if target.is_dir() and not target.is_symlink():
        if is_qcn_artifact(target):
            return
        try:
            empty = next(target.iterdir(), None) is None
        except OSError:
            empty = False
        if empty:
            return
    raise OutputError(f"output {target} exists and is {describe(target)}; qcn replaces only directories it wrote "
                      "(a qcn manifest.json): choose another output, remove it, or pass --force to replace it")


# ---------------------------------------------------------------------------------------
# temporary directories and their locks

def _try_lock(lock: Path) -> int | None:
    """An fd holding an exclusive flock on `lock`, or None while another process holds it."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale(parent: Path) -> list[tuple[Path, int]]:
    """Remove qcn's temporary directories in `parent` whose owning process is gone (killed before
    it could clean up); a directory whose lock is held by a live process is left alone. Returns
    (path, bytes) of what was removed; each is logged as a warning with its size."""
    parent = Path(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    tokens = {n[len(p):] for n in names for p in (TMP_PREFIX, OLD_PREFIX, LOCK_PREFIX) if n.startswith(p)}
    for token in sorted(tokens):
        lock = parent / f"{LOCK_PREFIX}{token}"
        dirs = [parent / f"{p}{token}" for p in (TMP_PREFIX, OLD_PREFIX) if f"{p}{token}" in names]
        fd = None
        if lock.exists():
            fd = _try_lock(lock)
            if fd is None:
                if lock.exists():
                    log.debug("%s: in use by a running qcn (%s)", parent, token)
                    continue
        try:
            for d in dirs:
                if not (d.exists() or d.is_symlink()):
                    continue  # its owner finished in the meantime
                size = _size(d)
                _remove(d)
                removed.append((d, size))
                log.warning("removed %s (%s), left by a qcn run that was killed before it could clean up",
                            d, human_bytes(size))
            _remove(lock)
        finally:
            if fd is not None:
                os.close(fd)
    _report_legacy(parent, names)
    return removed


def _report_legacy(parent: Path, names: list[str]) -> None:
    """Temporary directories of qcn before 0.2 (`.<name>.tmp-XXXX`, `.<name>.old-XXXX`) carry no
    lock: they are reported, not removed."""
    for n in names:
        stem, _, tail = n[1:].rpartition(".")
        if n.startswith(".") and stem and (tail.startswith("tmp-") or tail.startswith("old-")):
            p = parent / n
            log.warning("%s (%s) looks like a temporary directory left by an older qcn; if no qcn-compile is "
                        "running, remove it: rm -r %s", p, human_bytes(_size(p)), p)


def _new_lock(parent: Path, name: str) -> tuple[str, Path, int]:
    """A fresh token whose lock file this process holds."""
    while True:
        token = f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        lock = parent / f"{LOCK_PREFIX}{token}"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a remove_stale that took the lock between our create and flock may have unlinked it
            if os.fstat(fd).st_nlink == 0 or os.stat(lock).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            continue
        os.write(fd, f"pid {os.getpid()}\n".encode())
        return token, lock, fd


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C / SIGTERM / SIGHUP wait until the renames and removals inside are done, then are
    delivered to the handler that was in place (Python runs signal handlers in the main thread
    only; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    for s in _SIGNALS:
        h = signal.getsignal(s)
        if h is None or h == signal.SIG_IGN:
            continue  # installed outside Python, or ignored: leave it
        old[s] = signal.signal(s, lambda n, _f: got.append(n))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for n in got:
            signal.raise_signal(n)


@contextlib.contextmanager
def atomic_dir(target: Path, *, force: bool = False, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target`; when the body finishes it replaces
    `target`, on any exception it is removed, so `target` is never left half-written and no
    temporary directory outlives the call. `target` must pass `check_output(target, force=...,
    protect=...)` (checked before the body runs and again before the swap)."""
    target = Path(target).expanduser()
    protect = tuple(protect)
    check_output(target, force=force, protect=protect)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output {target}: cannot create {parent}: {e.strerror}") from None
    remove_stale(parent)
    try:
        token, lock, fd = _new_lock(parent, target.name)
    except OSError as e:
        raise OutputError(f"output {target}: cannot write in {parent}: {e.strerror}") from None
    tmp = parent / f"{TMP_PREFIX}{token}"
    old = parent / f"{OLD_PREFIX}{token}"
    try:
        try:
            tmp.mkdir(mode=0o755)
            yield tmp
        except BaseException:
            with _signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        with _signals_deferred():
            try:
                raise_if_interrupted()  # a signal whose exception a finalizer swallowed: still stop here
                check_output(target, force=force, protect=protect)
                if target.exists() or target.is_symlink():
                    target.rename(old)
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if old.exists() and not target.exists():
                    old.rename(target)
                raise
            _remove(old)
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


# ---------------------------------------------------------------------------------------
# hashing with a stat cache

def default_cache_path() -> Path | None:
    """`$XDG_CACHE_HOME/qcn/sha256.json` (default `~/.cache/qcn/sha256.json`); safe to delete.
    None where there is no home directory (then hashes are remembered per process only)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):
            return None
    return Path(base) / "qcn" / "sha256.json"


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set from user space: a file rewritten and given its old mtime back still misses
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino]


class HashCache:
    """sha256 of files, remembered by (absolute path, size, mtime_ns, ctime_ns, device, inode).

    Any write to a file changes its mtime and ctime, so a changed byte always misses the cache
    and is hashed again; an unchanged file is not re-read. `path=None`: no file, per-process only.
    """

    VERSION = 1

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list] = {}
        self._new: dict[str, list] = {}
        self.hashed_bytes = 0  # bytes actually read (a cache miss), for progress and benchmarks
        if self.path is not None:
            self._entries = self._read()

    def _read(self) -> dict[str, list]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict) or raw.get("version") != self.VERSION or not isinstance(raw.get("entries"), dict):
            return {}
        return raw["entries"]

    def lookup(self, path: Path) -> tuple[str | None, os.stat_result]:
        p = str(Path(path).absolute())
        st = os.stat(p)
        hit = self._new.get(p) or self._entries.get(p)
        if hit and hit[:-1] == _stat_key(st):
            return hit[-1], st
        return None, st

    def sha256(self, path: Path, progress=None) -> str:
        digest, st = self.lookup(path)
        if digest is None:
            digest = sha256_file(path, progress=progress)
            self.hashed_bytes += st.st_size
            after = os.stat(path)
            if _stat_key(after) == _stat_key(st):  # not written while we read it
                self._new[str(Path(path).absolute())] = _stat_key(st) + [digest]
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record ``digest`` for ``path`` as it is now: for a file whose bytes are known not to have
        changed while its ctime did (the passes stage hard-links export files)."""
        self._new[str(Path(path).absolute())] = _stat_key(os.stat(path)) + [digest]

    def moved(self, old_dir: Path, new_dir: Path) -> None:
        """`old_dir` was renamed to `new_dir` (atomic_dir's swap): its files kept their inodes
        and times, so their entries are moved along."""
        old_prefix, new = str(Path(old_dir).absolute()) + os.sep, Path(new_dir).absolute()
        for p in [p for p in self._new if p.startswith(old_prefix)]:
            self._new[str(new / p[len(old_prefix):])] = self._new.pop(p)

    def save(self) -> None:
        """Merge this process's new entries into the cache file (dropping entries of files that
        are gone or changed); an unwritable cache is only logged."""
        if self.path is None or not self._new:
            return
        entries = {**self._read(), **self._new}
        keep = {}
        for p, e in entries.items():
            try:
                if _stat_key(os.stat(p)) == e[:-1]:
                    keep[p] = e
            except OSError:
                pass
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": self.VERSION, "entries": keep}))
            os.replace(tmp, self.path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EPERM):
                raise
            log.info("hash cache %s not written (%s); the next compile hashes again", self.path, e.strerror)
        self._entries, self._new = keep, {}
