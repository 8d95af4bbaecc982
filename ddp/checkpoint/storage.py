"""What a write the disk refused says: one line naming the directory, the size needed, what is free.

A full disk (ENOSPC), an exceeded quota (EDQUOT), an I/O error (EIO) or a filesystem gone
read-only (EROFS) is not a problem of the recipe, so it is not a refusal (exit 2): it is a
``StorageError`` (exit 74), and a script can tell "fix the disk, run the same command again" from
"fix the recipe". Pure wording and arithmetic: who says it is ``ddp.checkpoint.checkpointer``'s.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch

from ddp.checkpoint import files
from ddp.errors import StorageError

# errno → (what the disk said, the fix); the fix is followed by "then run the same command again"
_DISK = {
    errno.ENOSPC: ("no space left on device", "free space there (or set run.dir elsewhere)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, which may be less than the free space "
                                          "(quota -s), or set run.dir elsewhere"),
    errno.EIO: ("I/O error", "check the disk (dmesg) and its mount"),
    errno.EROFS: ("read-only filesystem", "remount it read-write (a disk error may have made it read-only) or set "
                                          "run.dir elsewhere"),
}
_UNWRITABLE = (errno.EACCES, errno.EPERM)  # at the start only: a directory this user may not write


def disk_errno(err: BaseException) -> int | None:
    """The errno of ``err`` (or of an OSError it wraps) when it is the disk's fault, else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def payload_bytes(obj: Any) -> int:
    """About how many bytes ``torch.save(obj)`` writes: its tensors' bytes (and strings'), found
    through nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(value) for value in obj)
    return 0


def human_size(n: float) -> str:
    """``human_size(1_250_000)`` → "1.2 MB" (MB = 2^20 bytes, as in ``ddp.memory``)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(directory: Path) -> int | None:
    """Free bytes on the filesystem of ``directory`` (or of its nearest existing parent)."""
    for path in (directory, *directory.parents):
        try:
            return shutil.disk_usage(path).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def save_failed(err: BaseException, directory: Path, name: str, needed: int | None) -> StorageError | None:
    """The error every rank raises after the disk refused the save of checkpoint ``name`` in
    ``directory``; None when ``err`` is not the disk's fault. ``needed``: bytes the save needs."""
    code = disk_errno(err)
    if code is None:
        return None
    what, fix = _DISK[code]
    free = free_bytes(directory)
    size = f"it needs about {human_size(needed)}" if needed is not None else "its size is unknown"
    room = f"{human_size(free)} free there" if free is not None else "the free space there is unknown"
    resumes = newest_valid(directory)
    again = (f"it resumes from {resumes}" if resumes else "there is no checkpoint to resume from, so it "
             "starts over")
    return StorageError(f"checkpoint {name} not saved: {what} in {directory}: {size}; {room}.",
                        f"{fix}, then run the same command again: {again}")


def unwritable(run_dir: Path, err: OSError) -> StorageError | None:
    """The refusal of a run directory the run cannot write, before anything trains; None when
    ``err`` is something else."""
    if err.errno not in _DISK and err.errno not in _UNWRITABLE:
        return None
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    return StorageError(f"cannot write the run directory {run_dir}: {reason}{where}.",
                        "make it writable for this user, free space there or set run.dir elsewhere, then run "
                        "the same command again")


def newest_valid(directory: Path) -> str | None:
    """The name of the newest checkpoint in ``directory`` that matches its manifest: what
    ``train.resume=auto`` resumes."""
    for path in files.candidates(directory):
        try:
            files.verify(path)
            return path.name
        except (files.CheckpointError, OSError):
            continue
    return None


def file_refused(path: Path, err: BaseException, needed: int | None = None) -> StorageError | None:
    """The refusal of a single file (``python -m ddp.export``'s DEST) the disk or its permissions
    would not take; None when ``err`` is something else. ``needed``: bytes the file needs."""
    code = disk_errno(err)
    if code is None and isinstance(err, OSError) and err.errno in _UNWRITABLE:
        code = err.errno
    if code is None:
        return None
    what = _DISK[code][0] if code in _DISK else "permission denied"
    free = free_bytes(path.parent)
    room = ""
    if code in (errno.ENOSPC, errno.EDQUOT) and needed is not None and free is not None:
        room = f": it needs about {human_size(needed)}; {human_size(free)} free there"
    return StorageError(f"cannot write {path}: {what} in {path.parent}{room}.",
                        "choose a destination on a writable disk with room (or free space there), then run the "
                        "same command again")
