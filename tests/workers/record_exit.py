"""``python -m ddp.train`` that also writes the status it exits with to ``exit-rank<RANK>.txt`` in
the working directory: torchrun does not report its ranks' exit codes when a signal stops it.

Usage: torchrun ... tests/workers/record_exit.py [key=value ...]
"""

import os
import runpy
from pathlib import Path

status = "no exit status (an exception escaped)"
try:
    runpy.run_module("ddp.train", run_name="__main__", alter_sys=True)
    status = "0"
except SystemExit as done:
    status = str(done.code)
    raise
finally:
    Path(f"exit-rank{os.environ['RANK']}.txt").write_text(status + "\n")
