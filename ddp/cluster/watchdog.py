"""Silent faults, found from outside the training loop: a rank that stopped answering, a node cut
off from the others, and a job where no rank makes progress.

A killed process resets its connections and its peers' next collective fails within seconds. A
frozen process (``SIGSTOP``, a kernel hang) or a machine cut off from the network resets nothing:
every other rank would wait inside its next collective until ``dist.timeout_s``. So every rank
judges liveness itself, from the heartbeats every rank writes to the rendezvous store
(``ddp.cluster.heartbeat``): a rank whose beat did not move for ``dist.heartbeat_timeout_s``, or a
store this rank could not reach for as long, ends this rank at once with one line naming whom it
lost, their host and when each was last heard, exit 1. The judge runs on its own thread and does
no I/O, so it decides even while the beat thread or the training thread is blocked.

A stall is different: every rank is alive, but none finishes a step (a data loader stuck on a
network filesystem, ranks in different collectives, a deadlock). When the ranks' progress counts
(``ddp.cluster.progress``) do not move for ``dist.stall_timeout_s``, every rank writes the stack of
each of its threads into its rank log (and, under NCCL, the flight recorder's record of its last
collectives), and rank 0 says on the console which rank is behind and where each one is. The job
then waits on (a slow step is not a failure) unless ``dist.stall_action=exit``. Saving a checkpoint
and starting up do not count as stalls: a long save is waited for, however long it takes.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ddp.cluster.progress import DONE, SAVING, STARTING, Position

log = logging.getLogger(__name__)

CHECK_S = 0.5  # how often the judge looks
STALL_FLOOR_S = 120.0  # dist.stall_timeout_s=0 (auto): never less than this...
STALL_STEPS = 20  # ...nor than this many median steps
SUSPENDED_GAP_S = 5.0  # the judge itself did not run for this long: this process was stopped, not its peers
EXIT_LOST = 1
EXIT_STALLED = 1


@dataclass(frozen=True)
class WatchConfig:
    heartbeat_timeout_s: float = 30.0  # 0: no liveness judgement (a lost peer is named after a failed collective)
    stall_timeout_s: float = 0.0  # 0: auto (max(STALL_FLOOR_S, STALL_STEPS × the median step))
    stall_exit: bool = False  # after the stall report, end the job (dist.stall_action=exit)


@dataclass(frozen=True)
class Verdict:
    """What the judge decided: ``exit`` ends this rank with ``line``; else report a stall."""

    line: str
    exit: bool
    stall: bool = False


@dataclass
class Judge:
    """The decisions, kept apart from threads and clocks so they can be tested with made-up times.

    ``observe`` takes what the beat thread read from the store (each rank's beat count and
    position, None where absent) at monotonic time ``now``; ``verdict(now)`` says whether this
    rank must exit (a lost rank or store) or report a stall, each said once."""

    rank: int
    world: int
    hosts: list[str]  # the host of each rank, as it reported at the rendezvous
    store: str  # who serves the rendezvous store, for the message when it is the one lost
    cfg: WatchConfig
    started: float  # monotonic time the judge started: every rank counts as heard then
    serves_store: bool = False  # this rank's own process serves the store (rank 0 without a torchrun agent)
    beats: list[int] = field(init=False)
    heard: list[float] = field(init=False)  # monotonic
    heard_wall: list[float] = field(init=False)  # wall clock, for the message
    positions: list[Position | None] = field(init=False)
    store_ok: float = field(init=False)
    progress: int = -1
    progress_at: float = field(init=False)
    stall_said: bool = False
    last_check: float = field(init=False)

    def __post_init__(self) -> None:
        wall = time.time()
        self.beats = [-1] * self.world
        self.heard = [self.started] * self.world
        self.heard_wall = [wall] * self.world
        self.positions = [None] * self.world
        self.store_ok = self.progress_at = self.last_check = self.started

    def observe(self, beats: list[int | None], positions: list[Position | None], now: float) -> None:
        wall = time.time() - (time.monotonic() - now)
        for rank, beat in enumerate(beats):
            if beat is not None and beat != self.beats[rank]:
                self.beats[rank], self.heard[rank], self.heard_wall[rank] = beat, now, wall
        self.positions = positions
        self.store_ok = now

    def verdict(self, now: float) -> Verdict | None:
        if now - self.last_check > SUSPENDED_GAP_S:  # this process was stopped: nobody was heard meanwhile
            self._forgive(now)
        self.last_check = now
        return self._liveness(now) or self._stall(now)

    def _forgive(self, now: float) -> None:
        shift = now - self.last_check
        self.heard = [t + shift for t in self.heard]
        self.store_ok += shift
        self.progress_at += shift

    # --- liveness -----------------------------------------------------------------------------

    def _liveness(self, now: float) -> Verdict | None:
        limit = self.cfg.heartbeat_timeout_s
        if limit <= 0:
            return None
        if now - self.store_ok > limit:
            return Verdict(self._store_lost(now), exit=True)
        if now - self.store_ok > limit / 2 and not self.serves_store:
            return None  # reads from another process are overdue: its silence, not the ranks', decides (a frozen rank 0)
        quiet = [r for r in range(self.world) if r != self.rank and not self._finished(r)
                 and now - self.heard[r] > limit / 2]
        if any(now - self.heard[r] > limit for r in quiet):  # the ones nearly as quiet went with it (a machine)
            return Verdict(self._ranks_lost(quiet, now), exit=True)
        return None

    def _finished(self, rank: int) -> bool:
        position = self.positions[rank]
        return position is not None and position.phase == DONE

    def _store_lost(self, now: float) -> str:
        others = [r for r in range(self.world) if self.hosts[r] != self.hosts[self.rank]]  # whom it lost
        heard = f"; {self._who(others, now)}" if others else ""
        return (f"lost contact with {self.store} for {now - self.store_ok:.0f} s "
                f"(dist.heartbeat_timeout_s={self.cfg.heartbeat_timeout_s:g}): this machine is cut off from it, or it "
                f"is down or frozen{heard}. HINT: check that machine and the network between them; torchrun --max-restarts=N "
                "(or launch node --max-restarts N) restarts the group and resumes from the latest checkpoint")

    def _ranks_lost(self, silent: list[int], now: float) -> str:
        first = silent[0]
        return (f"lost {_ranks(silent)} of {self.world}: no heartbeat for {self.cfg.heartbeat_timeout_s:g} s "
                f"(dist.heartbeat_timeout_s); {self._who(silent, now)}. HINT: check logs/rank{first}.log and that "
                "machine (a stopped or frozen process, power, network); torchrun --max-restarts=N restarts the "
                "group and resumes from the latest checkpoint")

    def _who(self, ranks: list[int], now: float) -> str:
        """'ranks 2, 3 on h1 last heard at 12:03:05 (31 s ago)': grouped by host, each host with the
        last time any of its ranks was heard (the ranks of one machine fall silent a beat apart)."""
        groups: dict[str, list[int]] = {}
        for rank in ranks:
            groups.setdefault(self.hosts[rank], []).append(rank)
        lines = []
        for host, group in groups.items():
            last = max(group, key=lambda r: self.heard[r])
            at = datetime.fromtimestamp(self.heard_wall[last]).strftime("%H:%M:%S")
            lines.append(f"{_ranks(group)} on {host} last heard at {at} ({round(now - self.heard[last])} s ago)")
        return "; ".join(lines)

    # --- stalls -------------------------------------------------------------------------------

    def stall_limit(self) -> float:
        if self.cfg.stall_timeout_s > 0:
            return self.cfg.stall_timeout_s
        medians = [p.median_step_s for p in self.positions if p is not None]
        return max(STALL_FLOOR_S, STALL_STEPS * max(medians, default=0.0))

    def _stall(self, now: float) -> Verdict | None:
        positions = self.positions
        known = [p for p in positions if p is not None]
        total = sum(p.count for p in known)
        exempt = (len(known) < self.world or any(p.count == 0 or p.phase in (STARTING, SAVING, DONE) for p in known))
        if total != self.progress or exempt:
            self.progress, self.progress_at, self.stall_said = total, now, False
            return None
        waited = now - self.progress_at
        if self.stall_said or waited <= self.stall_limit():
            return None
        self.stall_said = True
        return Verdict(self._stall_line(known, waited), exit=self.cfg.stall_exit, stall=True)

    def _stall_line(self, positions: list[Position], waited: float) -> str:
        lowest = min(p.order() for p in positions)
        behind = [r for r, p in enumerate(positions) if p.order() == lowest]
        where: dict[str, list[int]] = {}
        for rank, position in enumerate(positions):
            where.setdefault(position.describe(), []).append(rank)
        places = "; ".join(f"{_ranks(rs)} {place}" for place, rs in where.items())
        who = ("every rank is at the same place" if len(behind) == self.world else
               f"{_ranks(behind)} on {', '.join(sorted({self.hosts[r] for r in behind}))} behind")
        what = "ending the job (dist.stall_action=exit)" if self.cfg.stall_exit else \
            "waiting on (dist.stall_action=exit ends the job instead)"
        return (f"stalled: no rank finished a step for {waited:.0f} s (dist.stall_timeout_s="
                f"{self.stall_limit():g}): {who}: {places}. The stack of every thread of every rank is in "
                f"logs/rank<N>.log; {what}")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


class Watchdog:
    """The judge's thread. ``feed`` is called by the beat thread after each read of the store."""

    def __init__(self, judge: Judge, nccl_dumps: Path | None = None,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.judge, self.nccl_dumps, self._exit = judge, nccl_dumps, exit_process
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def feed(self, beats: list[int | None], positions: list[Position | None]) -> None:
        with self._lock:
            self.judge.observe(beats, positions, time.monotonic())

    def _run(self) -> None:
        while not self._stop.wait(CHECK_S):
            with self._lock:
                verdict = self.judge.verdict(time.monotonic())
            if verdict is None:
                continue
            if verdict.stall:
                self._report_stall(verdict)
            if verdict.exit:
                self._end(verdict.line, EXIT_STALLED if verdict.stall else EXIT_LOST)
                return

    def _report_stall(self, verdict: Verdict) -> None:
        rank = self.judge.rank
        path = _rank_log()
        _dump_stacks(path, f"stall report: {verdict.line}")
        _dump_nccl(self.nccl_dumps, rank)
        where = f"written to {path}" if path else "written to stderr"
        log.log(logging.WARNING if rank == 0 else logging.INFO, "%s", verdict.line if rank == 0 else
                f"stalled: stacks of every thread {where}")

    def _end(self, line: str, code: int) -> None:
        """Log ``line`` (console and rank log) and end the process: its peers may never answer. The
        logging runs on a thread of its own: if the training thread holds a handler (a log file
        on a hung filesystem), the line goes straight to stderr after a moment instead."""
        if not self._stop.is_set():
            writer = threading.Thread(target=lambda: log.error("%s", line), daemon=True)
            writer.start()
            writer.join(timeout=2)
            if writer.is_alive():
                os.write(sys.stderr.fileno(), f"error: [rank {self.judge.rank}] {line}\n".encode())
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            self._exit(code)


def _rank_log() -> str | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _dump_stacks(path: str | None, header: str) -> None:
    """Every thread's Python stack (the standard library's ``faulthandler``), appended to ``path``."""
    if path is None:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {header}\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)


def _dump_nccl(directory: Path | None, rank: int) -> None:
    """Under NCCL: the flight recorder's record of this rank's last collectives, for fr_trace."""
    import torch

    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if directory is None or dump is None or not torch.cuda.is_available():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"stall_rank_{rank}").write_bytes(dump())
    except Exception as err:  # noqa: BLE001 - the stack dump above is the main evidence
        log.info("no flight-recorder dump: %s", err)
