"""Run ``ddp.train`` with a slow spot: one rank's data loading stalls once, and/or one save is slow.

``SLOW_DATA_RANK=r SLOW_DATA_STEP=k SLOW_DATA_S=s``: rank r sleeps s seconds while loading the
batch after step k (in ``stuck_loading_data``, the frame its stack dump must show).
``SLOW_SAVE_S=s``: rank 0's first checkpoint write sleeps s seconds before writing.
``python tests/workers/slow_spots.py key=value ...`` (the arguments of ``python -m ddp.train``).
"""

import os
import sys
import time

import torch.distributed as dist

from ddp.checkpoint import files
from ddp.cluster import progress
from ddp.train import main

_track, _save = progress.track, files.save
_slowed: list[str] = []


def stuck_loading_data(seconds: float) -> None:
    time.sleep(seconds)


def _stalling(batches, rank: int, after: int, seconds: float):
    for index, batch in enumerate(batches):
        if index == after and "data" not in _slowed and dist.get_rank() == rank:
            _slowed.append("data")
            stuck_loading_data(seconds)
        yield batch


def track(batches, phase=progress.DATA, after=progress.COMPUTE):
    if phase == progress.DATA and "SLOW_DATA_S" in os.environ:
        batches = _stalling(batches, int(os.environ["SLOW_DATA_RANK"]), int(os.environ["SLOW_DATA_STEP"]),
                            float(os.environ["SLOW_DATA_S"]))
    return _track(batches, phase, after)


def slow_save(*args, **kwargs):
    if "save" not in _slowed and "SLOW_SAVE_S" in os.environ:
        _slowed.append("save")
        time.sleep(float(os.environ["SLOW_SAVE_S"]))
    return _save(*args, **kwargs)


progress.track = track
files.save = slow_save
sys.exit(main(sys.argv[1:]))
