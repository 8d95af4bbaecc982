#!/bin/bash
# PYTHON for slurm/train.sbatch in tests: the real interpreter, except that a torchrun that ended well is
# followed by LINGER_S seconds (default 15) before the step ends, so a warning signal can arrive after
# training ended while the job is still running. Its real path is in REAL_PYTHON.
"$REAL_PYTHON" "$@"
rc=$?
if [ "$rc" = 0 ] && [[ " $* " == *" torch.distributed.run "* ]]; then
  echo "linger_python: training ended; lingering ${LINGER_S:-15} s" >&2
  sleep "${LINGER_S:-15}"
fi
exit "$rc"
