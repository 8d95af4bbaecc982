"""The model's and the optimizer's state as whole, plain state dicts, whatever the parallelism.

A checkpoint file holds the plain model's ``state_dict()`` and the optimizer's ``state_dict()``
(state keyed by parameter index), as one process would write them. Under DDP rank 0 has them
already. Under FSDP (``ddp.model.sharding``) every rank holds a shard: ``gather`` assembles the
whole dicts on rank 0 in host memory (``torch.distributed.checkpoint.state_dict`` with
``StateDictOptions(full_state_dict=True, cpu_offload=True)``) and ``load`` gives every rank its
shard of the whole dicts it read. So DDP and FSDP runs resume from each other's checkpoints.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import nn

from ddp.cluster import comm
from ddp.model.parallel import unwrap_model
from ddp.model.sharding import is_sharded

StateDict = dict[str, Any]


def gather(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[StateDict | None, StateDict | None]:
    """All ranks must call (under FSDP they gather). (model state, optimizer state) on rank 0,
    on the CPU under FSDP; (None, None) on the other ranks."""
    plain = unwrap_model(model)
    if not is_sharded(plain):
        if not comm.is_main():
            return None, None
        return plain.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(cpu_offload=True)
    weights = get_model_state_dict(plain, options=options)
    optim = get_optimizer_state_dict(plain, optimizer, options=options) if optimizer is not None else None
    if not comm.is_main():
        return None, None
    return weights, _by_index(optim) if optim is not None else None


def is_live(model: nn.Module) -> bool:
    """Does ``gather`` hand out the model's own tensors (DDP, one process), rather than host copies
    it made (FSDP)?"""
    return not is_sharded(unwrap_model(model))


def load(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: StateDict,
         optimizer_state: StateDict | None) -> None:
    """All ranks must call, each with the whole dicts (as read from a checkpoint). Under FSDP each
    rank keeps its shard; otherwise ``load_state_dict``. The optimizer's hyperparameters come
    with its state: the caller puts back the ones it wants to keep."""
    plain = unwrap_model(model)
    if not is_sharded(plain):
        plain.load_state_dict(weights)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(plain, dict(weights), options=_options())  # it replaces the dict's values
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(plain, optimizer, _by_name(optimizer_state, optimizer, plain), options=_options())


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """All ranks must call (under FSDP they gather, one tensor at a time). Every rank gets the
    whole weights, as copies on the CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in unwrap_model(model).state_dict().items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = whole.detach().cpu().clone()
    return out


def _options(cpu_offload: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _by_index(state: StateDict) -> StateDict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) → keyed by
    index in group order, as ``optimizer.state_dict()`` writes it."""
    index = {name: i for i, name in enumerate(chain.from_iterable(g["params"] for g in state["param_groups"]))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def _by_name(state: StateDict, optimizer: torch.optim.Optimizer, model: nn.Module) -> StateDict:
    """The inverse of ``_by_index``, for ``optimizer``'s parameters as they are in ``model``."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for param in chain.from_iterable(g["params"] for g in optimizer.param_groups)]
    saved = sum(len(group["params"]) for group in state["param_groups"])
    if saved != len(order):
        raise ValueError(f"the saved optimizer state covers {saved} parameters, this optimizer {len(order)}")
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
