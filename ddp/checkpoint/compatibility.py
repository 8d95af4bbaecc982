"""Whether a checkpoint fits this run: written by ``ddp.train`` (its format), for the same model
and dataset, with tensors of the same names and shapes; and the names of a state dict saved
through a wrapper (DDP, DataParallel, ``torch.compile``) without the wrapper's prefixes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp.checkpoint.files import CheckpointError
from ddp.config import Recipe, flat

FORMAT = 1
_PREFIXES = ("module.", "_orig_mod.")


def shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in weights.items()}


def check_compatible(payload: dict[str, Any], theirs: dict[str, tuple[int, ...]], recipe: Recipe, model: nn.Module,
                     path: Path) -> None:
    """Refuse, naming the difference, a checkpoint written for another model or dataset.
    ``theirs``: the shape of each of its model tensors."""
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ddp.train checkpoint (format {payload.get('format')!r}).",
                              "train.resume=never starts fresh")
    saved, current = flat(str(payload["recipe"])), flat(recipe)
    for key in ("model.name", "data.name"):
        was, now = saved.get(key), current.get(key)
        if was != now:
            raise CheckpointError(f"{path} was written for {key}={was}, this run has {key}={now}.",
                                  "use the recipe that wrote it, another run.name, or train.resume=never")
    mine = model.state_dict()
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or extra:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}.",
                              "use the recipe that wrote it or train.resume=never")
    for key, tensor in mine.items():
        if tuple(theirs[key]) != tuple(tensor.shape):
            raise CheckpointError(f"{path} does not fit this model: '{key}' is {list(theirs[key])} there and "
                                  f"{list(tensor.shape)} here.", "use the recipe that wrote it or train.resume=never")


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept state dicts saved from DDP / DataParallel / torch.compile wrappers."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out
