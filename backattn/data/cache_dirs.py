"""Cache directories built once, atomically: what the SmolLM2 conversion, the GSM-Symbolic data and the
feature cache share. The standard library and ``filelock`` only (nothing here may import torch).

A directory is built in a temporary sibling under an inter-process lock (``filelock.FileLock``: ``flock`` on
POSIX, ``msvcrt`` locking on Windows, a soft lock on a file system without ``flock``), made readable, and
renamed into place only when finished, so an interrupted build never leaves a directory that looks finished
and concurrent builders all end up with one finished directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def default_cache_dir() -> Path:
    """``$BACKATTN_CACHE`` if set, else ``~/.cache/backattn``."""
    env = os.environ.get("BACKATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "backattn"


def _remove_stale_temporaries(root: Path, prefix: str, max_age: float) -> None:
    now = time.time()
    for path in root.glob(prefix + "*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and now - path.stat().st_mtime >= max_age:
                shutil.rmtree(path, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a directory 0700 and some writers make 0600 files: open them as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _install(temporary: Path, final: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename a finished ``temporary`` to ``final``; a finished ``final`` (a concurrent build's) wins."""
    for _ in range(10):
        try:
            os.rename(temporary, final)  # fails if final exists and is not empty
            return
        except OSError:
            if is_complete(final):
                return
            if not (final.exists() or final.is_symlink()):
                raise
            stale = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"  # half-written: move aside
            with contextlib.suppress(OSError):
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not move {temporary} into place at {final}")


def build_once(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> bool:
    """Make ``final`` by ``build(temporary_directory)`` unless it is complete already; return whether it built.

    ``build`` must write whatever makes ``is_complete`` true last (a marker file), after flushing the rest.
    """
    if is_complete(final):
        return False
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    # Exclusive between processes; the lock file stays in place on release, so waiters share one inode.
    with FileLock(root / f".{final.name}.lock"):
        if is_complete(final):  # built by another process while we waited
            return False
        # With the lock held nobody else is building: every temporary directory is from a build that died.
        _remove_stale_temporaries(root, prefix, 0.0)
        temporary = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        try:
            build(temporary)
            _make_readable(temporary)
            _install(temporary, final, is_complete)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    if not is_complete(final):  # pragma: no cover - defensive
        raise RuntimeError(f"Building {final} did not produce a finished directory.")
    return True


def read_marker(directory: Path, name: str, format_version: int) -> dict | None:
    """The completion marker a finished build wrote last (a JSON object of this format), else ``None``."""
    try:
        with open(directory / name, encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == format_version else None
