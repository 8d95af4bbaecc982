"""Run a script whose loop uses ``ddp.setup``, delivering a real SIGTERM to one rank at one step.

``STOP_AT_STEP=k STOP_RANK=r python tests/workers/stop_at_step.py script.py args...``: when rank r
asks ``run.should_stop()`` after step k, this process sends itself SIGTERM first (as a preemption
would), and the ranks agree on signals after every step. The ranks must agree on the stop
through the library.
"""

import os
import runpy
import signal
import sys

from ddp.run import Run

STEP, RANK = int(os.environ["STOP_AT_STEP"]), int(os.environ.get("STOP_RANK", "1"))
_original = Run.should_stop
_sent = []


def should_stop(self: Run) -> bool:
    if self.step == STEP and self.rank == RANK and not _sent:
        _sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return _original(self)


_open = Run.open


def open_polling_every_step(self: Run, *args, **kwargs) -> Run:
    """The ranks agree on signals every step (``checkpoint.signal_poll_s=0``): a short test run
    could otherwise end before the next poll (they poll every 0.25 s by default)."""
    self.recipe.checkpoint.signal_poll_s = 0.0
    return _open(self, *args, **kwargs)


Run.should_stop = should_stop  # type: ignore[method-assign]
Run.open = open_polling_every_step  # type: ignore[method-assign]
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
