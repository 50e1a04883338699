"""Atomic file writes: a crash while writing leaves the previous file whole.

Everything a run leaves behind (checkpoints, ``results.json``, ``training_curves.png``) is written to a
temporary file in the same directory, flushed to disk, and moved over the target with ``os.replace``,
which POSIX guarantees atomic within one filesystem. A reader (or a resume after ``kill -9``) sees
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator


def temporary_path(path: str) -> str:
    """A hidden sibling of ``path`` (same directory, hence same filesystem, so ``os.replace`` is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def fsync_file(path: str) -> None:
    """Force ``path``'s bytes to disk (a rename can otherwise reach the disk before the data does)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def commit(temporary: str, path: str) -> None:
    """Flush ``temporary`` and move it over ``path`` atomically."""
    fsync_file(temporary)
    os.replace(temporary, path)
    # The rename itself lives in the directory entry: sync it too (best effort; not all filesystems allow it).
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        commit(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_atomic(path: str, writer: Callable[[str], Any]) -> None:
    """Call ``writer(temporary_path)`` and commit its output to ``path``."""
    with atomic_path(path) as temporary:
        writer(temporary)


def write_json_atomic(path: str, payload: Any) -> None:
    """``json.dump`` to ``path`` atomically (indented, keys in insertion order)."""

    def dump(temporary: str) -> None:
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")

    write_atomic(path, dump)
