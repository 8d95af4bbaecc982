"""Stop signals: SIGTERM, SIGUSR1, SIGUSR2 (preemption) and SIGINT (Ctrl-C) ask every rank to
checkpoint and stop; the run exits 75 after a preemption signal and 130 after Ctrl-C alone.

The handler only records the signal (and, for a first Ctrl-C, says once on rank 0 what happens
next). A second Ctrl-C more than a second after the first exits at once, without a checkpoint;
closer together they are one keypress reaching the process twice (a launcher that leaves its
ranks in the terminal's process group lets the terminal signal them and forward the signal too;
torchrun starts its ranks in their own session and only forwards). The ranks agree through an all_reduce on a small Gloo control
group, about every ``checkpoint.signal_poll_s`` seconds of training, overlapped with the following
steps: issued at one poll and read at the next, so the hot path never waits on it. The same
all_reduce carries each rank's mean step time; every rank derives the next poll interval (in
steps) from the identical reduced value, so all ranks poll, and stop, after the same step. It also
carries whether a background checkpoint save (``checkpoint.async_save``) failed: then every rank
raises that save's error at the same poll.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ddp.checkpoint.files import CheckpointError
from ddp.cluster import comm

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: checkpointed on request; run the same command again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C; checkpointed, run the same command again
PREEMPTION = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
SIGNALS = (*PREEMPTION, signal.SIGINT)
MAX_INTERVAL = 1000  # steps between polls, at most
SAME_KEYPRESS_S = 1.0  # a second SIGINT sooner than this is the first one forwarded by torchrun
_last_received = 0  # the stop signal this process received (as ``StopRequest.received``), for launchers
_listened = False  # a StopRequest took the stop signals in this process: training began


def exit_code_for(preempted: bool) -> int:
    return EXIT_PREEMPTED if preempted else EXIT_INTERRUPTED


def last_received() -> int:
    """The stop signal this process received (0: none). A job wrapper reads it after the run to
    choose what follows a stop: ``slurm.job`` requeues only on the scheduler's warning signal."""
    return _last_received


def training_began() -> bool:
    """True once a ``StopRequest`` took the stop signals in this process. A job wrapper whose own
    handler hears a signal (outside the ``StopRequest``'s lifetime) learns from it whether training
    is still to come or already over: ``slurm.job`` requeues nothing for a warning after training."""
    return _listened


class StopRequest:
    """All ranks must create it (it forms a process group) and call ``poll`` after every step."""

    def __init__(self, timeout_s: float, poll_s: float = 0.0) -> None:
        self.received: int = 0  # the signal number, set by the handler
        self.preempted = False  # after the ranks agreed: a preemption signal (not only Ctrl-C) was among them
        self._interrupted_at: float | None = None
        self.poll_s = poll_s
        self._previous: dict[int, Any] = {}
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                       if comm.world_size() > 1 else None)
        self._pending: Any = None
        self._buffer = torch.zeros(4, dtype=torch.float64)
        self.saves: Any = None  # the run's Checkpointer, once made: failed() and finish() (which raises)
        self._interval, self._steps, self._since = 1, 0, time.perf_counter()

    def install(self) -> StopRequest:
        global _listened
        if threading.current_thread() is threading.main_thread():
            _listened = True
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _last_received
        if signum == signal.SIGINT:
            self._interrupt()
        if not self.received or signum in PREEMPTION:
            self.received = _last_received = signum
        self.preempted = self.preempted or signum in PREEMPTION

    def _interrupt(self) -> None:
        """Ctrl-C: the first asks for a checkpoint; a later one (not the same keypress) quits now.
        Only ``os.write`` here: logging is not safe inside a signal handler."""
        now = time.monotonic()
        if self._interrupted_at is None:
            self._interrupted_at = now
            if comm.is_main():
                os.write(2, b"\ninterrupted: saving a checkpoint after the current step, then exiting "
                            b"(press Ctrl-C again to quit at once, without saving)\n")
        elif now - self._interrupted_at > SAME_KEYPRESS_S:
            if comm.is_main():
                os.write(2, b"interrupted again: exiting now, without a checkpoint\n")
            os._exit(EXIT_INTERRUPTED)

    def poll(self) -> bool:
        """All ranks must call after every step. True when the ranks have agreed to stop."""
        if self._group is None:
            if self._save_failed():
                self.saves.finish()  # raises the background save's error
            return self.received != 0
        self._steps += 1
        if self._steps < self._interval:
            return False
        decided, failed = self._collect()
        if failed:
            self._pending = None  # nothing in flight now: the error's path needs no last poll
            self.saves.finish()  # every rank raises the same error at this same poll...
            raise CheckpointError("a background checkpoint save failed on another rank.",  # ...or this
                                  "its log (logs/rank<N>.log) says why; run the same command again to resume")
        now = time.perf_counter()
        step_time, self._steps, self._since = (now - self._since) / self._steps, 0, now
        self._buffer = torch.tensor([1.0 if self.received else 0.0, 1.0 if self.preempted else 0.0, step_time,
                                     1.0 if self._save_failed() else 0.0], dtype=torch.float64)
        self._pending = dist.all_reduce(self._buffer, group=self._group, async_op=True)
        return decided

    def _save_failed(self) -> bool:
        return self.saves is not None and self.saves.failed()

    def _collect(self) -> tuple[bool, bool]:
        """Read the previous poll's result: (stop, a background save failed); set the next interval
        from the ranks' mean step time."""
        if self._pending is None:
            return False, False
        self._pending.wait()
        flags, preempted, step_times, failed = self._buffer.tolist()
        self.preempted = self.preempted or preempted > 0
        mean_step = step_times / comm.world_size()
        self._interval = max(1, min(MAX_INTERVAL, math.ceil(self.poll_s / mean_step))) if mean_step > 0 else 1
        return flags > 0, failed > 0

    def close(self, abandon: bool = False) -> None:
        """All ranks must call: completes the last poll and restores the previous handlers.

        ``abandon`` (after an error) drops the last poll instead of waiting on peers that may be gone.
        """
        if self._pending is not None and not abandon:
            self._pending.wait()
        self._pending = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """75 when any rank received a preemption signal, else 130 (Ctrl-C only)."""
        return exit_code_for(self.preempted)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"


@contextmanager
def stop_request(timeout_s: float, poll_s: float) -> Iterator[StopRequest]:
    """All ranks must enter. Installs the handlers; on an error, abandons the last poll."""
    stop = StopRequest(timeout_s, poll_s).install()
    try:
        yield stop
    except BaseException:
        stop.close(abandon=True)
        raise
    stop.close()
