"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

One mechanism for every file the project writes whole (reports, WAV outputs, checkpoints, ONNX
artifacts, small state files): the content goes to a hidden temporary file in the target's
folder (``.<name>.<random>.tmp``, created with ``O_EXCL`` so two writers never share one, mode
``0o666`` minus the umask like any new file), is flushed to disk, and is renamed onto the target
with :func:`os.replace`. On any failure the temporary file is removed and the target is left as
it was.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_files", "atomic_path", "write_atomic"]


def _temp_beside(target: Path) -> Path:
    """Create (exclusively) and return an empty hidden temporary file beside ``target``."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_files(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths for ``targets``; on a clean exit each is synced and renamed onto its target.

    The renames happen in the order the targets were given (so a file that describes the others,
    an index or a sidecar, goes last and whoever sees it sees them). The caller writes each
    temporary path by name (any library that takes a path will do). If the block raises, every
    temporary file is removed and no target changes.
    """
    finals = [Path(t) for t in targets]
    temps: list[Path] = []
    try:
        for final in finals:
            temps.append(_temp_beside(final))
        yield list(temps)
        for tmp in temps:
            _fsync(tmp)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the original error is the one worth reporting


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_files` for one target: yields its temporary path."""
    with atomic_files(target) as (tmp,):
        yield tmp


def write_atomic(target: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``target`` atomically. Raises ``OSError``."""
    with atomic_path(target) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
