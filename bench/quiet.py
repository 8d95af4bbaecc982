"""Other load on the machine: CPU time used by processes outside the benchmark.

On a 2-core machine anything else running (a test suite, an editor's indexer) distorts a launch
more than any difference between the loops. ``wait_until_quiet`` holds a launch back until the
machine is idle, and ``ForeignCpu`` measures, for one launch, the CPU time the whole machine used
minus the time used by the benchmark's own process tree (``/proc/stat`` minus ``getrusage``), so a
disturbed launch can be repeated instead of reported.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

TICKS_PER_S = 100  # USER_HZ of /proc/stat on Linux
IDLE_CORES = 0.15  # below this many busy cores (averaged over a second) the machine counts as quiet
CONTENDED_SHARE = 0.05  # a launch is disturbed when others used more than this share of its wall time × cores


def machine_busy_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (None where /proc/stat is missing)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_S


def own_cpu_s() -> float:
    """CPU seconds used by this process and every descendant it has reaped."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def wait_until_quiet(max_wait_s: float, interval_s: float = 0.3) -> float:
    """Sleep until the machine's busy cores fall below ``IDLE_CORES`` over one ``interval_s``, or
    ``max_wait_s`` passes; return the seconds spent (one interval when the machine is already idle)."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        before = machine_busy_s()
        if before is None:
            break
        time.sleep(interval_s)
        if (machine_busy_s() - before) / interval_s < IDLE_CORES:  # type: ignore[operator]
            break
    return time.perf_counter() - started


class ForeignCpu:
    """CPU seconds used by other processes between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self._busy, self._own, self._wall = machine_busy_s(), own_cpu_s(), time.perf_counter()

    def stop(self, cores: int) -> tuple[float, bool]:
        """(foreign CPU seconds, whether that disturbed the launch)."""
        busy = machine_busy_s()
        if busy is None or self._busy is None:
            return 0.0, False
        foreign = max(0.0, (busy - self._busy) - (own_cpu_s() - self._own))
        wall = time.perf_counter() - self._wall
        return foreign, foreign > CONTENDED_SHARE * wall * cores
