"""Preemption signals: SIGTERM, SIGUSR1 and SIGUSR2 ask every rank to checkpoint and stop.

The handler only records the signal. At each step boundary the ranks agree through an
all_reduce on a small Gloo control group, overlapped with the next step (it is issued after step k
and read after step k+1), so every rank stops after the same step and the hot path never waits.
"""

from __future__ import annotations

import logging
import signal
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


class StopRequest:
    """All ranks must create it (it forms a process group) and call ``poll`` after every step."""

    def __init__(self, timeout_s: float) -> None:
        self.received: int = 0  # the signal number, set by the handler
        self._previous: dict[int, Any] = {}
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                       if comm.world_size() > 1 else None)
        self._pending: Any = None
        self._flag = torch.zeros(1, dtype=torch.int32)

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else: no logging, no I/O inside a signal handler

    def poll(self) -> bool:
        """All ranks must call, at the same step. True when any rank had a signal one poll ago."""
        if self._group is None:
            return self.received != 0
        decided = False
        if self._pending is not None:
            self._pending.wait()
            decided = bool(self._flag.item())
        self._flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, group=self._group, async_op=True)
        return decided

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
def stop_request(timeout_s: float) -> Iterator[StopRequest]:
    """All ranks must enter. Installs the handlers; on an error, abandons the last poll."""
    stop = StopRequest(timeout_s).install()
    try:
        yield stop
    except BaseException:
        stop.close(abandon=True)
        raise
    stop.close()
