"""Durable, all-or-nothing file writes: temporary file in the same directory, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: Path, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary handle; on success flush → fsync → rename over ``path`` → fsync the directory.

    A reader sees the old file or the complete new one, never a part; a crash midway leaves only a
    hidden ``.<name>.*.tmp``. The directory fsync makes the rename itself durable; after a group
    of renames in one directory, one (``sync_dir`` on the last) suffices.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str, sync_dir: bool = True) -> None:
    with atomic_open(path, sync_dir) as handle:
        handle.write(text.encode("utf-8"))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
