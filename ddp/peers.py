"""Naming the rank that vanished when a collective fails.

A Gloo/NCCL error says "Connection reset by peer [10.0.0.7]:41234", not which rank died. After a
communication failure the surviving ranks hold a roll call in the rendezvous store: each writes its
own key and waits briefly for the others'. Ranks that never answer are the ones reported.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import torch.distributed as dist

from ddp.errors import DDPError

ROLL_CALL_S = 3.0
_COMM_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset|refused)|timed out|timeout|broken pipe|"
                           r"connectFullMesh|socket", re.IGNORECASE)


class PeerLost(DDPError):
    """A collective failed because one or more ranks are gone (crashed, killed, or hung)."""

    exit_code = 1


def is_comm_failure(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or bool(_COMM_FAILURE.search(str(err)))


def roll_call(store: dist.Store, rank: int, world: int, wait_s: float = ROLL_CALL_S) -> list[int] | None:
    """Ranks that do not check in within ``wait_s``; None when the store itself is unreachable."""
    try:
        store.set(f"roll_call/{rank}", "here")
    except Exception:  # noqa: BLE001 - the store's host is gone too
        return None
    deadline = time.monotonic() + wait_s
    missing = []
    for other in range(world):
        if other == rank:
            continue
        try:
            store.wait([f"roll_call/{other}"], timedelta(seconds=max(deadline - time.monotonic(), 0.05)))
        except dist.DistNetworkError:  # the store's host is gone (set() may still have "succeeded")
            return None
        except Exception:  # noqa: BLE001 - a timeout means no answer
            missing.append(other)
    return missing


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
