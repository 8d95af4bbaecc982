"""Naming the rank that vanished when a collective fails.

A Gloo/NCCL error says "Connection reset by peer [10.0.0.7]:41234", not which rank died. Every
rank runs a heartbeat while its process group lives: a thread adds 1 to ``beat/<rank>`` in the
rendezvous store every ``BEAT_S`` seconds on its own store connection, so a rank blocked inside a
collective (waiting for a peer that itself stopped to investigate) still shows it is alive. After a
communication failure a survivor reads every counter twice, ``ROLL_CALL_S`` apart: ranks whose
counter did not move are the ones reported.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ddp.cluster import progress
from ddp.cluster.progress import Position
from ddp.cluster.watchdog import Judge, WatchConfig, Watchdog
from ddp.errors import DDPError

ROLL_CALL_S = 3.0
BEAT_S = 0.5
_COMM_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset|refused)|timed out|timeout|broken pipe|"
                           r"connectFullMesh|socket", re.IGNORECASE)


class PeerLost(DDPError):
    """A collective failed because one or more ranks are gone (crashed, killed, or hung)."""

    exit_code = 1


def is_comm_failure(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or bool(_COMM_FAILURE.search(str(err)))


@contextmanager
def heartbeat(host: str, port: int, prefix: str, rank: int, world: int = 1, store_host: str = "the rendezvous store",
              watch: WatchConfig | None = None, nccl_dumps: Path | None = None,
              serves_store: bool = False) -> Iterator[None]:
    """Every rank enters (after the rendezvous). Beats until the body exits; a lost store ends it.

    With each beat the rank also publishes where it is (``ddp.cluster.progress``) and reads every
    rank's beat and position (one request) for its watchdog (``ddp.cluster.watchdog``), which ends
    this rank when a peer or the store falls silent for ``watch.heartbeat_timeout_s`` and reports a
    stall. On a clean exit the rank says it is done, so a rank that finishes first is not taken
    for a lost one while the others end their run."""
    client = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30),
                                                    wait_for_workers=False))
    watchdog = _watchdog(client, rank, world, store_host, watch, nccl_dumps, serves_store)
    stop = threading.Event()
    keys = [f"beat/{r}" for r in range(world)] + [f"pos/{r}" for r in range(world)]

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                client.add(f"beat/{rank}", 1)
                if watchdog is not None:
                    client.set(f"pos/{rank}", progress.snapshot().encode())
                    watchdog.feed(*_decode(client.multi_get(keys), world))
            except Exception:  # noqa: BLE001 - the store is gone: the watchdog notices the silence
                if stop.is_set():
                    return
                time.sleep(BEAT_S)

    client.add(f"beat/{rank}", 1)
    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    clean = False
    try:
        yield
        clean = True
    finally:
        stop.set()
        if watchdog is not None:
            watchdog.stop()
        thread.join(timeout=5)
        if clean:
            _say_done(client, rank)


def _watchdog(client: dist.Store, rank: int, world: int, store_host: str, watch: WatchConfig | None,
              nccl_dumps: Path | None, serves_store: bool = False) -> Watchdog | None:
    if watch is None or world <= 1:
        return None
    progress.reset()
    hosts = machine_names([_host(client, r) for r in range(world)])
    judge = Judge(rank, world, hosts, store_host, watch, started=time.monotonic(), serves_store=serves_store)
    return Watchdog(judge, nccl_dumps).start()


def _host(client: dist.Store, rank: int) -> tuple[str, str]:
    """(host name, node rank) as the rank checked in (``rendezvous.gather``)."""
    try:
        host, _, node = client.get(f"join/{rank}").decode().partition("\t")
        return host, node
    except Exception:  # noqa: BLE001 - only for messages
        return "?", "?"


def machine_names(joined: list[tuple[str, str]]) -> list[str]:
    """Each rank's machine for messages: its host name, with the node rank where machines share a
    name (containers and network namespaces often do), so two machines never read as one."""
    nodes_of: dict[str, set[str]] = {}
    for host, node in joined:
        nodes_of.setdefault(host, set()).add(node)
    return [host if len(nodes_of[host]) == 1 else f"{host} (node {node})" for host, node in joined]


def _decode(values: list[bytes], world: int) -> tuple[list[int | None], list[Position | None]]:
    beats = [int(v) if v else None for v in values[:world]]
    positions = [Position.decode(v.decode()) if v else None for v in values[world:]]
    return beats, positions


def _say_done(client: dist.Store, rank: int) -> None:
    progress.mark(progress.DONE)
    try:
        client.set(f"pos/{rank}", progress.snapshot().encode())
    except Exception:  # noqa: BLE001 - the others judge by their own timeouts then
        pass


def roll_call(store: dist.Store, rank: int, world: int, wait_s: float = ROLL_CALL_S) -> list[int] | None:
    """Ranks whose heartbeat did not move within ``wait_s``; None when the store is unreachable."""
    try:
        before = _beats(store, world)
        time.sleep(wait_s)
        after = _beats(store, world)
    except Exception:  # noqa: BLE001 - the store's host is gone too
        return None
    return [other for other in range(world) if other != rank and after[other] <= before[other]]


def _beats(store: dist.Store, world: int) -> list[int]:
    return [store.add(f"beat/{other}", 0) for other in range(world)]


def peer_lost(err: BaseException, missing: list[int] | None, world: int, store_host: str) -> PeerLost:
    """The one-line error for a communication failure, naming the lost ranks when known.
    ``store_host`` names who serves the rendezvous store (reported when the store is gone too)."""
    cause = _short(err)
    if missing is None:
        who = store_host
        return PeerLost(f"lost contact with {who} after: {cause}.",
                        "check that rank's log (logs/rank0.log) and host; torchrun --max-restarts=N restarts "
                        "the group and resumes from the latest checkpoint")
    if missing:
        names = ", ".join(str(r) for r in missing)
        return PeerLost(f"lost rank {names} of {world}: no answer within {ROLL_CALL_S:.0f} s after: {cause}.",
                        f"check logs/rank{missing[0]}.log and that rank's host; torchrun --max-restarts=N "
                        "restarts the group and resumes from the latest checkpoint")
    return PeerLost(f"a collective failed though every rank still answers: {cause}.",
                    "look for the first error in logs/rank*.log")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo prefixes the C++ source location
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0]
    return f"{type(err).__name__}: {first[:200]}"
