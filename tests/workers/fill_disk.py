"""``python -m ddp.train`` whose disk fills up right after its first checkpoint, and which writes
the status it exits with to ``exit-rank<RANK>.txt`` in the working directory (``record_exit.py``).

``FILL_DISK=<file> torchrun ... tests/workers/fill_disk.py [key=value ...]``: once rank 0's first
save is complete, ``<file>`` takes all the free space of its filesystem but ``FILL_DISK_LEAVE``
bytes (default 8 KiB), so the next save meets a full disk. Without ``FILL_DISK`` it is
``record_exit.py`` alone (the rerun after the user freed the space).
"""

import os
import runpy
import shutil
from pathlib import Path

from ddp.checkpoint import files

FILLER = os.environ.get("FILL_DISK")
LEAVE = int(os.environ.get("FILL_DISK_LEAVE", "8192"))
_save = files.save


def save_then_fill(*args, **kwargs):
    manifest = _save(*args, **kwargs)
    filler = Path(FILLER)  # type: ignore[arg-type]
    if not filler.exists():
        with filler.open("wb") as handle:
            handle.write(bytes(max(0, shutil.disk_usage(filler.parent).free - LEAVE)))
    return manifest


if FILLER:
    files.save = save_then_fill
runpy.run_path(str(Path(__file__).with_name("record_exit.py")), run_name="__main__")
