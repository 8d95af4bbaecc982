"""``python -m ddp.train`` whose checkpoint saves can be held, for the chaos runs (``tests/chaos.py``).

Usage: ``CHAOS_DIR=DIR torchrun ... -m tests.workers.held_save [key=value ...]``

Each rank appends ``<rank> <restart count> <pid>`` to ``DIR/starts`` as it starts (before torch is
imported), so the controller knows every attempt's processes. The controller asks for a hold by
creating a file in DIR; the writer (rank 0) then stops there, says so with a ``held-`` file, and
waits until the controller deletes the request (it kills a rank meanwhile), at most ``MAX_HOLD_S``:

- ``save-<step>``: inside the save of step <step>, with its temporary ``.tmp`` file partly written
  (the first bytes flushed to disk, the rest and the rename still to come);
- ``after-<step>``: right after that save is complete (``latest`` names it), before the ranks hear
  its outcome.

Without requests (or without ``CHAOS_DIR``) it trains exactly like ``python -m ddp.train``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

CHAOS_DIR = Path(os.environ["CHAOS_DIR"]) if os.environ.get("CHAOS_DIR") else None
if CHAOS_DIR is not None:
    with (CHAOS_DIR / "starts").open("a") as starts:
        env = os.environ
        starts.write(f"{env.get('RANK', '0')} {env.get('TORCHELASTIC_RESTART_COUNT', '0')} {os.getpid()}\n")

from ddp.checkpoint import files  # noqa: E402 - after the start is recorded: a kill may come during these imports
from ddp.train import main  # noqa: E402

MAX_HOLD_S = 60.0
PARTIAL_BYTES = 4096  # hold once at least this much of the .pt is on disk (the file is ~1.2 MB)


def hold(request: str) -> None:
    """Wait while ``CHAOS_DIR/request`` exists, after saying so in ``CHAOS_DIR/held-<request>``."""
    if CHAOS_DIR is None or not (CHAOS_DIR / request).exists():
        return
    (CHAOS_DIR / f"held-{request}").write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + MAX_HOLD_S
    while (CHAOS_DIR / request).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


class _HeldHandle:
    """Passes writes through; after the first ``PARTIAL_BYTES`` it flushes and holds once."""

    def __init__(self, handle: BinaryIO, request: str) -> None:
        self.handle, self.request, self.written = handle, request, 0

    def write(self, data: Any) -> int:
        count = self.handle.write(data)
        before, self.written = self.written, self.written + count
        if before < PARTIAL_BYTES <= self.written:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            hold(self.request)
        return count

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


_atomic_open, _save = files.atomic_open, files.save


@contextmanager
def held_atomic_open(path: Path, sync_dir: bool = True) -> Iterator[Any]:
    with _atomic_open(path, sync_dir) as handle:
        yield _HeldHandle(handle, f"save-{_step(path)}")


def held_save(directory: Path, payload: dict[str, Any], step: int, *args: Any, **kwargs: Any) -> files.Manifest:
    manifest = _save(directory, payload, step, *args, **kwargs)
    hold(f"after-{step}")
    return manifest


def _step(path: Path) -> int:
    return int(path.stem.split("-")[1])


files.atomic_open = held_atomic_open  # files.save's own name for it: only the .pt goes through here
files.save = held_save  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
