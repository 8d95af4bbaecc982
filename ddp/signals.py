"""Preemption signals: SIGTERM, SIGUSR1 and SIGUSR2 ask every rank to checkpoint and stop.

The handler only records the signal. The ranks agree through an all_reduce on a small Gloo control
group, about every ``checkpoint.signal_poll_s`` seconds of training, overlapped with the following
steps: issued at one poll and read at the next, so the hot path never waits on it. The same
all_reduce carries each rank's mean step time; every rank derives the next poll interval (in
steps) from the identical reduced value, so all ranks poll, and stop, after the same step.
"""

from __future__ import annotations

import logging
import math
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

from ddp import comm

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: checkpointed on request; run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
MAX_INTERVAL = 1000  # steps between polls, at most
_last_received = 0  # the newest stop signal this process received, for launchers that act on it


def last_received() -> int:
    """The newest stop signal this process received (0: none). A job wrapper reads it after the run
    to choose what follows a stop: ``slurm.job`` requeues only on the scheduler's warning signal."""
    return _last_received


class StopRequest:
    """All ranks must create it (it forms a process group) and call ``poll`` after every step."""

    def __init__(self, timeout_s: float, poll_s: float = 0.0) -> None:
        self.received: int = 0  # the signal number, set by the handler
        self.poll_s = poll_s
        self._previous: dict[int, Any] = {}
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                       if comm.world_size() > 1 else None)
        self._pending: Any = None
        self._buffer = torch.zeros(2, dtype=torch.float64)
        self._interval, self._steps, self._since = 1, 0, time.perf_counter()

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _last_received
        self.received = _last_received = signum  # nothing else: no logging, no I/O in a signal handler

    def poll(self) -> bool:
        """All ranks must call after every step. True when the ranks have agreed to stop."""
        if self._group is None:
            return self.received != 0
        self._steps += 1
        if self._steps < self._interval:
            return False
        decided = self._collect()
        now = time.perf_counter()
        step_time, self._steps, self._since = (now - self._since) / self._steps, 0, now
        self._buffer = torch.tensor([1.0 if self.received else 0.0, step_time], dtype=torch.float64)
        self._pending = dist.all_reduce(self._buffer, group=self._group, async_op=True)
        return decided

    def _collect(self) -> bool:
        """Read the previous poll's result; set the next interval from the ranks' mean step time."""
        if self._pending is None:
            return False
        self._pending.wait()
        flags, step_times = self._buffer.tolist()
        mean_step = step_times / comm.world_size()
        self._interval = max(1, min(MAX_INTERVAL, math.ceil(self.poll_s / mean_step))) if mean_step > 0 else 1
        return flags > 0

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
