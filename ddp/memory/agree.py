"""Every rank takes the same batch sizes: one collective, the smallest verified size per kind.

A rank whose probe failed sends its error instead; then every rank raises it (naming the rank),
so no rank trains while another has stopped, and none waits in a collective the others skipped.
"""

from __future__ import annotations

from typing import Any

from ddp.cluster import comm
from ddp.errors import DDPError, MemoryBudgetError


class ProbeFailed(DDPError):
    """A trial step failed on some rank for a reason other than the budget."""

    exit_code = 1


def agree(sizes: dict[str, int] | None, error: BaseException | None, report: dict[str, Any]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """All ranks must call, once. Returns (the agreed sizes, every rank's report by rank).

    ``sizes`` maps "train"/"eval" to this rank's verified size; ``error`` is this rank's failure."""
    mine = {"sizes": sizes, "report": report, "error": None if error is None else _describe(error)}
    everyone = comm.all_gather_object(mine)
    for rank, theirs in enumerate(everyone):
        if theirs["error"] is not None:
            raise _rebuild(theirs["error"], rank, len(everyone))
    kinds = everyone[0]["sizes"].keys()
    return {kind: min(r["sizes"][kind] for r in everyone) for kind in kinds}, [r["report"] for r in everyone]


def _describe(error: BaseException) -> dict[str, Any]:
    if isinstance(error, DDPError):
        return {"problem": error.problem, "hint": error.hint, "budget": isinstance(error, MemoryBudgetError)}
    return {"problem": f"{type(error).__name__}: {error}", "hint": "see this rank's log", "budget": False}


def _rebuild(error: dict[str, Any], rank: int, world: int) -> DDPError:
    problem = error["problem"] if world == 1 else f"rank {rank}: {error['problem']}"
    if error["budget"]:
        return MemoryBudgetError(problem, error["hint"])
    return ProbeFailed(f"the memory probe failed on {problem}", error["hint"])
