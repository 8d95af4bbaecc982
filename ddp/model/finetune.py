"""Starting weights and frozen layers: ``model.pretrained``, ``model.weights``, ``model.freeze``,
``model.unfreeze_after_epochs``.

Pretrained torchvision weights are read from the local torch hub cache (``torch.hub.get_dir()``/
checkpoints), never fetched: a missing file is a one-line refusal, never a silent random init.
The ImageNet head is replaced by a new linear layer for the recipe's classes. Any rank may call
these functions; none communicates.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from ddp.config import ModelConfig
from ddp.errors import ConfigError

log = logging.getLogger(__name__)

HEADS = {"resnet18": "fc", "vgg16": "classifier.6"}  # the layer a new head replaces


def pretrained_file(name: str) -> Path:
    """The cached torchvision ImageNet weights of ``name`` (refused when absent)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    filename = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise ConfigError(f"model.pretrained=true: {filename} is not in the torch hub cache {path.parent}.",
                          f"copy it there (from {weights.url}) or set model.weights=<path to the file>")
    return path


def torchvision_model(cfg: ModelConfig, classes: int | None) -> nn.Module:
    """torchvision's ``cfg.name`` with ImageNet weights (hub cache or ``model.weights``) and a new
    ``classes``-way head."""
    from torchvision.models import get_model

    path = Path(cfg.weights) if cfg.weights else pretrained_file(cfg.name)
    model = get_model(cfg.name, weights=None)
    load_state(model, path, "model.weights" if cfg.weights else "model.pretrained")
    head_name = HEADS[cfg.name]
    parent_name, _, leaf = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
    new = nn.Linear(old.in_features, classes or old.out_features)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)
    return model


def load_state(model: nn.Module, path: Path, key: str) -> None:
    """Load a state_dict file, or the weights of a sharded checkpoint directory, into ``model``
    (every key must match)."""
    from ddp.checkpoint.files import is_sharded

    sharded_dir = path.is_dir() and is_sharded(path)
    if not path.is_file() and not sharded_dir:
        raise ConfigError(f"{key}: weights file '{path}' not found.", "give the path of a saved state_dict")
    try:
        if sharded_dir:
            from ddp.checkpoint.sharded import read_weights

            state = read_weights(path)  # every shard, put together in this process
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # one of our checkpoints
        model.load_state_dict(state)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"{key}: cannot load '{path}' into the model: {reason}.",
                          "use weights saved from this same architecture (torch.save(model.state_dict(), path))"
                          ) from None


def prepare_model(model: nn.Module, cfg: ModelConfig) -> None:
    """Load ``model.weights`` into your own model, then freeze the ``model.freeze`` patterns."""
    if cfg.weights and not (cfg.pretrained or cfg.name in HEADS):
        load_state(model, Path(cfg.weights), "model.weights")
    frozen = freeze(model, cfg.freeze)
    if frozen:
        log.debug("frozen: %d parameter tensors", len(frozen))


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Stop gradients for parameters whose names match any pattern (``fnmatch``: ``layer1.*``);
    a pattern matching nothing is refused. Returns the frozen names."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
            raise ConfigError(f"model.freeze pattern {pattern!r} matches no parameter.",
                              f"patterns match parameter names such as {sample} (e.g. 'layer1.*')")
    frozen = []
    for name, param in model.named_parameters():
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def unfreeze(model: nn.Module) -> int:
    """Let every parameter train again; returns how many were frozen."""
    count = 0
    for param in model.parameters():
        if not param.requires_grad:
            param.requires_grad_(True)
            count += 1
    return count
