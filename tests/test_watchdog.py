"""The watchdog's decisions with made-up clocks (``ddp.cluster.watchdog.Judge``): who is lost and
when, what is a stall and what is not. Real frozen ranks, stalls and long saves:
tests/test_silent_faults.py."""

from __future__ import annotations

from datetime import datetime

import pytest

from ddp.cluster.progress import COMPUTE, DATA, DONE, SAVING, Position
from ddp.cluster.watchdog import STALL_FLOOR_S, Judge, WatchConfig

HOSTS = ["h0", "h0", "h1", "h1"]


def judge(rank: int = 0, **cfg) -> Judge:
    return Judge(rank, 4, HOSTS, "node 0 (ranks 0-1 at 10.0.0.1:29500), whose launcher serves the rendezvous store,",
                 WatchConfig(**{"heartbeat_timeout_s": 10.0, **cfg}), started=100.0)


def at(step: int, phase: str = COMPUTE, count: int | None = None, median: float = 0.01) -> Position:
    return Position(phase, step, step if count is None else count, median)


def beat_all(j: Judge, now: float, beats: list[int | None], positions=None) -> None:
    j.observe(beats, positions or [at(5)] * 4, now)


def every_second(j: Judge, start: float, end: float, beats_of, positions_of=None):
    """Observe once a second and check every half second, as the threads do; the first verdict."""
    t = start
    while t <= end:
        if float(t).is_integer():
            beat_all(j, t, beats_of(t), positions_of(t) if positions_of else None)
        verdict = j.verdict(t)
        if verdict is not None:
            return t, verdict
        t += 0.5
    return None, None


def test_a_rank_whose_beat_stops_is_named_with_its_host_after_the_timeout_and_not_before():
    j = judge()
    frozen_at = 120

    def beats(t):
        return [int(t), int(t), min(int(t), frozen_at), int(t)]

    when, verdict = every_second(j, 101, 200, beats)
    assert verdict is not None and verdict.exit and not verdict.stall
    assert frozen_at + 10 < when <= frozen_at + 11.5  # heard last at 120, timeout 10 s
    assert verdict.line.startswith("lost rank 2 of 4: no heartbeat for 10 s (dist.heartbeat_timeout_s); rank 2 on h1 "
                                   "last heard at ")
    assert "HINT: check logs/rank2.log" in verdict.line


def test_a_whole_silent_machine_is_one_group_in_the_line():
    j = judge()
    when, verdict = every_second(j, 101, 200, lambda t: [int(t), int(t), 110, 110])
    assert verdict.line.startswith("lost ranks 2, 3 of 4:") and "ranks 2, 3 on h1 last heard at" in verdict.line


def test_ranks_that_fell_silent_a_moment_apart_are_named_together():
    j = judge()
    when, verdict = every_second(j, 101, 200, lambda t: [int(t), int(t), min(int(t), 110), min(int(t), 113)])
    assert 120 < when <= 121.5 and verdict.line.startswith("lost ranks 2, 3 of 4:"), verdict.line


def test_the_ranks_of_one_machine_heard_last_either_side_of_a_second_are_one_group_at_the_later_time(monkeypatch):
    """Rank 3's last beat was read at 12:00:27.9 and rank 2's at 12:00:28.1: one group, one time."""
    import ddp.cluster.watchdog as watchdog

    j = judge()
    base = 1_700_000_000.0  # a wall clock for the whole run, 101 s before the first observation
    monkeypatch.setattr(watchdog.time, "time", lambda: base + watchdog.time.monotonic() - 101)
    j.observe([1, 1, 1, 1], [None] * 4, 127.9)
    j.observe([2, 2, 2, 1], [None] * 4, 128.1)
    line = j._ranks_lost([2, 3], 133.2)
    heard = datetime.fromtimestamp(base + 128.1 - 101).strftime("%H:%M:%S")
    assert f"; ranks 2, 3 on h1 last heard at {heard} (5 s ago). HINT" in line, line


def test_machines_sharing_a_host_name_are_told_apart_by_node():
    from ddp.cluster.heartbeat import machine_names

    assert machine_names([("a", "0"), ("a", "0"), ("b", "1")]) == ["a", "a", "b"]
    assert machine_names([("vm", "0"), ("vm", "1")]) == ["vm (node 0)", "vm (node 1)"]


def test_a_rank_that_said_it_is_done_is_never_taken_for_lost():
    j = judge()
    done = [at(5), at(5), Position(DONE, 5, 5, 0.0), at(5)]
    when, verdict = every_second(j, 101, 200, lambda t: [int(t), int(t), 110, int(t)], lambda t: done)
    assert verdict is None


def test_losing_the_store_names_it_and_the_ranks_on_other_machines():
    j = judge(rank=2)
    when, verdict = every_second(j, 101, 130, lambda t: [int(t)] * 4)  # all fine while the store answers
    assert verdict is None
    t = 130.5
    while (verdict := j.verdict(t)) is None:  # no more reads: the store is unreachable from here
        t += 0.5
        assert t < 200
    assert 140 < t <= 141
    assert verdict.exit and verdict.line.startswith(
        "lost contact with node 0 (ranks 0-1 at 10.0.0.1:29500), whose launcher serves the rendezvous store, for 10 s "
        "(dist.heartbeat_timeout_s=10): this machine is cut off from it, or it is down or frozen; ranks 0, 1 on h0 last "
        "heard at ")


def test_a_frozen_store_server_is_named_as_the_store_even_when_its_last_beat_came_before_the_last_read():
    """Rank 0 serves the store and beats; its last beat (at 119) precedes rank 2's last read (120), so its
    beat alone would pass the timeout first. While reads are overdue, the store decides."""
    j = judge(rank=2)
    when, verdict = every_second(j, 101, 120, lambda t: [min(int(t), 119)] + [int(t)] * 3)
    assert verdict is None
    t = 120.5
    while (verdict := j.verdict(t)) is None:
        t += 0.5
        assert t < 200
    assert 130 < t <= 131 and verdict.line.startswith("lost contact with node 0 "), verdict.line


def test_only_a_rank_that_reads_the_store_from_another_process_waits_for_the_stores_verdict():
    """Reads stall after 120 while ranks 2, 3 (h1) fell silent at 119. Rank 0 serves the store in its
    own process, so it is not the one cut off: it names the silent ranks (as on the two-node Slurm
    testbed when h1 was lost). Rank 2 reads from another process: its silence is the store's."""
    verdicts = {}
    for rank, serves in ((0, True), (2, False)):
        j = Judge(rank, 4, HOSTS, "rank 0 (at 10.0.0.1), which serves the rendezvous store,",
                  WatchConfig(heartbeat_timeout_s=10.0), started=100.0, serves_store=serves)
        every_second(j, 101, 120, lambda t: [int(t), int(t), min(int(t), 119), min(int(t), 119)])
        t = 120.5
        while (verdict := j.verdict(t)) is None:  # no more reads
            t += 0.5
            assert t < 200
        verdicts[rank] = (t, verdict.line)
    assert 129 < verdicts[0][0] <= 130 and verdicts[0][1].startswith("lost ranks ") and \
        "ranks 2, 3 on h1" in verdicts[0][1], verdicts[0]
    assert 130 < verdicts[2][0] <= 131 and verdicts[2][1].startswith("lost contact with rank 0 "), verdicts[2]


def test_a_process_that_was_itself_stopped_does_not_blame_its_peers():
    j = judge()
    beat_all(j, 101, [1, 1, 1, 1])
    assert j.verdict(101) is None
    # SIGSTOP/SIGCONT of this process (or the whole job suspended): nothing ran for 60 s here
    assert j.verdict(161) is None
    beat_all(j, 162, [2, 2, 2, 2])
    assert j.verdict(162) is None


def test_no_liveness_judgement_when_the_timeout_is_zero():
    j = judge(heartbeat_timeout_s=0.0)
    moving = lambda t: [at(int(t) - 100)] * 4  # noqa: E731 - progress goes on: no stall either
    when, verdict = every_second(j, 101, 300, lambda t: [int(t), 5, 5, 5], moving)
    assert verdict is None


def stalled_at(step: int):
    """Rank 1 waits for data of ``step + 1``; the others wait in that step's collective."""
    return lambda t: [at(step), at(step, DATA), at(step), at(step)]


def test_a_stall_is_reported_once_naming_the_rank_behind_and_where_each_rank_is():
    j = judge(stall_timeout_s=5.0)
    moving = lambda t: [at(int(t) - 100)] * 4  # noqa: E731 - a step a second
    assert every_second(j, 101, 110, lambda t: [int(t)] * 4, moving) == (None, None)
    when, verdict = every_second(j, 111, 140, lambda t: [int(t)] * 4, stalled_at(10))
    assert verdict is not None and verdict.stall and not verdict.exit
    assert 115 < when <= 116  # the last progress was at 110
    assert verdict.line.startswith("stalled: no rank finished a step for 6 s (dist.stall_timeout_s=5): rank 1 on h0 "
                                   "behind: ")
    assert "rank 1 loading data for step 11" in verdict.line
    assert "ranks 0, 2, 3 computing step 11" in verdict.line
    assert "waiting on (dist.stall_action=exit ends the job instead)" in verdict.line
    assert every_second(j, 117, 160, lambda t: [int(t)] * 4, stalled_at(10)) == (None, None)  # said once


def test_a_stall_with_stall_action_exit_ends_the_rank():
    j = judge(stall_timeout_s=5.0, stall_exit=True)
    every_second(j, 101, 105, lambda t: [int(t)] * 4, lambda t: [at(int(t) - 100)] * 4)
    when, verdict = every_second(j, 106, 140, lambda t: [int(t)] * 4, stalled_at(5))
    assert verdict.stall and verdict.exit and "ending the job (dist.stall_action=exit)" in verdict.line


@pytest.mark.parametrize("phase", [SAVING, DONE])
def test_a_long_save_or_a_finished_rank_is_no_stall(phase):
    j = judge(stall_timeout_s=5.0)
    positions = [at(10, phase), at(10, SAVING if phase == SAVING else COMPUTE), at(10), at(10)]
    assert every_second(j, 101, 200, lambda t: [int(t)] * 4, lambda t: positions) == (None, None)


def test_no_stall_before_every_rank_finished_its_first_step():
    j = judge(stall_timeout_s=5.0)
    first = [at(0, DATA), at(1), at(1), at(1)]  # rank 0 still compiling / loading its first batch
    assert every_second(j, 101, 200, lambda t: [int(t)] * 4, lambda t: first) == (None, None)


def test_the_automatic_stall_timeout_is_a_multiple_of_the_slowest_ranks_median_step_with_a_floor():
    j = judge()
    j.observe([1] * 4, [at(5, median=0.05)] * 4, 101)
    assert j.stall_limit() == STALL_FLOOR_S
    j.observe([2] * 4, [at(5, median=0.05), at(5, median=30.0), at(5), at(5)], 102)
    assert j.stall_limit() == 600.0
