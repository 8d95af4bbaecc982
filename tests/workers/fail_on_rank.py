"""``python -m ddp.train`` with a fault injected on one rank (for the logging tests).

Usage: torchrun ... tests/workers/fail_on_rank.py RANK [key=value ...]
The chosen rank warns at step 1 and raises RuntimeError("boom on rank R") at step 3.
"""

import sys
import warnings

from ddp.cluster import comm
from ddp.train import main
from ddp.engine.trainer import Trainer

FAIL_RANK = int(sys.argv[1])
_original = Trainer._run_batch


def _faulty_batch(self, inputs, targets, sums):
    if comm.rank() == FAIL_RANK:
        if self.state.global_step == 0:
            warnings.warn(f"injected warning on rank {FAIL_RANK}")
        if self.state.global_step == 2:
            raise RuntimeError(f"boom on rank {FAIL_RANK}")
    return _original(self, inputs, targets, sums)


Trainer._run_batch = _faulty_batch

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
