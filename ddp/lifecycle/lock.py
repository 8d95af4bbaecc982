"""One run at a time per version directory: rank 0 holds an ``flock`` on ``version_N/.lock``.

Two copies of the same command started side by side would otherwise both resume the newest
version and write into it together. The lock dies with the process that holds it, so a killed
run, a torchrun restart or a Slurm requeue never finds a stale lock. The file says who holds it,
for the message. Filesystems without ``flock`` support run unlocked (with a debug line).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

from ddp.checkpoint.files import CheckpointError
from ddp.cluster.environment import hostname

log = logging.getLogger(__name__)

_held: dict[Path, int] = {}  # version dir → open descriptor, in this process


def acquire(version: Path) -> None:
    """Rank 0. Lock ``version`` for this process or raise CheckpointError naming the holder."""
    path = version / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise CheckpointError(f"{version} is in use by another run ({holder}).",
                              "wait for it to finish or stop it; to train alongside it: train.resume=never "
                              "(a new version) or another run.name") from None
    except OSError as err:  # e.g. ENOLCK on a filesystem without flock
        log.debug("cannot lock %s (%s): running without the lock", path, err)
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": hostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held[version] = fd


def release(version: Path) -> None:
    """Rank 0, when the run ends (also after an error). No-op when not held."""
    fd = _held.pop(version, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock; the file stays, empty of meaning


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def held(version: Path) -> bool:
    """True while a run holds ``version``'s lock (it is training there); for readers such as
    ``python -m ddp.report``. The probe takes a shared lock and drops it at once."""
    try:
        fd = os.open(version / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no flock on this filesystem: nothing to tell
        return False
    finally:
        os.close(fd)
