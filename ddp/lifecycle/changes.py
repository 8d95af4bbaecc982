"""What changed between the recipe a checkpoint was trained with and the recipe resuming it.

Every recipe key has a policy (``POLICIES``, first matching pattern wins):
  honoured  the resumed run uses the new value (the LR schedule is rebuilt from it, hyperparameters
            replace the checkpoint's); the change is logged and recorded in the run's history;
  refused   resuming cannot give the run the new value without silently breaking it (other weights,
            other data, another optimizer's state, another sample order): one line names the key;
  ignored   keys that choose the run rather than describe it (``train.resume``, ``run.*``).
A key no pattern matches is refused, so a new recipe key must be classified before it can change
on resume (``tests/test_lifecycle.py`` checks that every key of the schema is).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any

import yaml

from ddp.checkpoint.files import CheckpointError


class Policy(str, Enum):
    honoured = "honoured"
    refused = "refused"
    ignored = "ignored"


_OTHER_DATA = "the checkpoint was trained on other data"
POLICIES: tuple[tuple[str, Policy, str], ...] = (
    ("train.resume", Policy.ignored, ""),
    ("run.*", Policy.ignored, ""),
    ("model.freeze", Policy.refused, "the optimizer's state covers other parameters"),
    ("model.unfreeze_after_epochs", Policy.refused, "the optimizer's state covers other parameters"),
    ("model.*", Policy.refused, "the checkpoint's weights belong to another model"),
    ("data.name", Policy.refused, _OTHER_DATA),
    ("data.args", Policy.refused, _OTHER_DATA),
    ("data.args.*", Policy.refused, _OTHER_DATA),
    ("data.image_size", Policy.refused, _OTHER_DATA),
    ("data.synthetic_*", Policy.refused, _OTHER_DATA),
    ("data.test_fraction", Policy.refused, "the train/test split would change"),
    ("data.split_seed", Policy.refused, "the train/test split would change"),
    ("optim.name", Policy.refused, "the checkpoint holds another optimizer's state"),
    ("optim.decay_norms_and_biases", Policy.refused, "the checkpoint's optimizer groups its parameters otherwise"),
    ("train.seed", Policy.refused, "the interrupted epoch's sample order depends on it"),
    ("train.loss", Policy.refused, "its logged losses and best checkpoint would no longer compare"),
    ("data.root", Policy.honoured, ""),
    ("data.batch_size", Policy.honoured, ""),  # resumes at the same global sample, like a new world size
    ("data.eval_batch_size", Policy.honoured, ""),
    ("data.loader", Policy.honoured, ""),
    ("data.memory_limit_mb", Policy.honoured, ""),
    ("data.num_workers", Policy.honoured, ""),
    ("data.download", Policy.honoured, ""),  # only where the same files come from
    ("optim.*", Policy.honoured, ""),
    ("train.epochs", Policy.honoured, ""),
    ("train.max_steps", Policy.honoured, ""),
    ("train.deterministic", Policy.honoured, ""),
    ("train.label_smoothing", Policy.honoured, ""),
    ("train.clip_grad_norm", Policy.honoured, ""),
    ("train.accumulate", Policy.honoured, ""),
    ("train.precision", Policy.honoured, ""),
    ("train.compile", Policy.honoured, ""),
    ("train.channels_last", Policy.honoured, ""),  # weights stay fp32; a new GradScaler starts from its default scale  # the schedule continues at the same global sample
    ("checkpoint.*", Policy.honoured, ""),
    ("dist.*", Policy.honoured, ""),
    ("log.*", Policy.honoured, ""),
    ("memory.*", Policy.honoured, ""),  # sizes auto batches; a resume keeps the checkpoint's sizes anyway
)


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
    for pattern, policy, reason in POLICIES:
        if fnmatchcase(key, pattern):
            return policy, reason
    return Policy.refused, "resuming with another value of this key is not supported"


def recipe_changes(saved_yaml: str, current_yaml: str) -> list[Change]:
    """Keys whose values differ, with their policies (ignored keys left out). A key the saved
    recipe lacks (written before the key existed) is compared with nothing and not reported."""
    saved, current = flatten(yaml.safe_load(saved_yaml) or {}), flatten(yaml.safe_load(current_yaml) or {})
    changes = []
    for key, after in current.items():
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


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def show_value(value: Any) -> str:
    """A recipe value as a user would type it."""
    return "null" if value is None else str(value)
