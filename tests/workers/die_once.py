"""``python -m ddp.train`` whose first attempt loses one rank to SIGKILL (for the restart tests).

Usage: ``DIE_RANK=r DIE_AT=save-<k>|step-<k>|writing-<k> torchrun --max-restarts=1 ... tests/workers/die_once.py [key=value ...]``

Only in torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), rank r kills itself:
- ``save-<k>``: right after the checkpoint of step k is complete on every rank;
- ``step-<k>``: as step k begins (before any checkpoint, when k comes before the first save);
- ``writing-<k>``: on the background thread of a sharded ``checkpoint.async_save``, once its own shards
  of step k are written, before the checkpoint is published.
"""

import os
import signal
import sys

from ddp.checkpoint.checkpointer import Checkpointer
from ddp.cluster import comm
from ddp.engine.trainer import Trainer
from ddp.train import main

WHEN, STEP = os.environ["DIE_AT"].split("-")
RANK, FIRST = int(os.environ.get("DIE_RANK", "1")), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
_save, _run_batch, _written = Checkpointer.save, Trainer._run_batch, Checkpointer._shards_written


def _die(when: str, step: int) -> None:
    if FIRST and comm.rank() == RANK and (when, step) == (WHEN, int(STEP)):
        os.kill(os.getpid(), signal.SIGKILL)


def save(self, model, optimizer, scheduler, state, *args, **kwargs):
    _save(self, model, optimizer, scheduler, state, *args, **kwargs)
    _die("save", state.global_step)


def run_batch(self, inputs, targets, sums):
    _die("step", self.state.global_step + 1)
    return _run_batch(self, inputs, targets, sums)


def shards_written(partial, payload):
    out = _written(partial, payload)
    _die("writing", int(partial.name.split("-")[1].split(".")[0]))  # .step-00000006.dcp.partial
    return out


Checkpointer.save = save
Trainer._run_batch = run_batch
Checkpointer._shards_written = staticmethod(shards_written)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
