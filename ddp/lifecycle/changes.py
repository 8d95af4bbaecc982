"""What changed between the recipe a checkpoint was trained with and the recipe resuming it.

Every recipe key declares its policy beside it in ``ddp.config`` (``setting(resume=...)``):
  honoured  the resumed run uses the new value (the LR schedule is rebuilt from it, hyperparameters
            replace the checkpoint's); the change is logged and recorded in the run's history;
  refused   resuming cannot give the run the new value without silently breaking it (other weights,
            other data, another optimizer's state, another sample order): one line names the key;
  ignored   keys that choose the run rather than describe it (``train.resume``, ``run.*``).
A key the schema lacks is refused; a new recipe key cannot be declared without a policy
(``tests/test_config.py`` checks that every key of the schema has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddp.checkpoint.files import CheckpointError
from ddp.config import Policy, Recipe, flat, resume_policy


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any
    policy: Policy
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.key} {show_value(self.before)} → {show_value(self.after)}"


def policy_of(key: str) -> tuple[Policy, str]:
    """(policy, reason) of ``key``, as ``ddp.config`` declares it."""
    return resume_policy(key)


def recipe_changes(saved_yaml: str, current: Recipe) -> list[Change]:
    """Keys whose values differ between a checkpoint's recipe (the YAML it carries) and this run's,
    with their policies (ignored keys left out). A key the saved recipe lacks (written before the
    key existed) is compared with nothing and not reported."""
    saved, now = flat(saved_yaml), flat(current)
    changes = []
    for key, after in now.items():
        if key not in saved or saved[key] == after or after == "auto":  # auto resumes at the saved value
            continue
        policy, reason = policy_of(key)
        if policy != Policy.ignored:
            changes.append(Change(key, saved[key], after, policy, reason))
    return changes


def check_resumable(changes: list[Change], checkpoint: str) -> None:
    """Raise one CheckpointError naming the first refused change, if any."""
    refused = [c for c in changes if c.policy == Policy.refused]
    if refused:
        first = refused[0]
        others = f" (also: {', '.join(c.key for c in refused[1:])})" if refused[1:] else ""
        raise CheckpointError(
            f"cannot resume {checkpoint} with {first.key}={show_value(first.after)}: it was trained with "
            f"{first.key}={show_value(first.before)} and {first.reason}{others}.",
            f"keep {first.key}={show_value(first.before)} to resume, or train.resume=never to start a new version")


def describe(changes: list[Change]) -> str:
    return ", ".join(str(c) for c in changes if c.policy == Policy.honoured)


def show_value(value: Any) -> str:
    """A recipe value as a user would type it."""
    return "null" if value is None else str(value)
