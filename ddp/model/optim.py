"""Optimizer and per-step learning-rate schedule from the recipe's ``optim`` section.

The schedule is one closed-form multiplier of the step (``lr_factor``) behind a ``LambdaLR``, so it
can be rebuilt for any step: a resumed run builds it from ITS recipe and places it where training
stands, so ``train.epochs`` 2 → 4 follows a 4-epoch run's schedule from there on and a new
``optim.lr`` takes effect.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ddp.config import OptimConfig, OptimizerName, Schedule


def build_optimizer(model: nn.Module, cfg: OptimConfig, trainable_only: bool = True) -> torch.optim.Optimizer:
    """Over the trainable parameters only (frozen layers are not in it), or every parameter when
    frozen ones will train later (``model.unfreeze_after_epochs``: they get no gradient until then)."""
    params = param_groups(model, cfg, trainable_only)
    if cfg.name == OptimizerName.sgd:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == OptimizerName.adam:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(model: nn.Module, cfg: OptimConfig, trainable_only: bool = True) -> list[dict]:
    """One group, or (with ``optim.decay_norms_and_biases=false``, the default) a second group
    without weight decay for biases and normalisation weights: every 1-D parameter. Empty groups
    are left out, so the grouping depends on the model only (a changed weight decay still resumes)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if cfg.decay_norms_and_biases:
        return [{"params": params}]
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    total_steps: int, start_step: int = 0) -> LambdaLR:
    """A scheduler stepped once per optimizer step, placed so the next step uses
    ``lr_factor(start_step)``; the base learning rate is the recipe's ``optim.lr``."""
    factor = partial(lr_factor, cfg=cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then
    cosine to 0 at ``total_steps`` / ×gamma every ``step_epochs`` epochs / constant."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    after = step - warmup
    if cfg.schedule == Schedule.cosine:
        span = max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(after, span) / span))
    if cfg.schedule == Schedule.step:
        return cfg.gamma ** (after // (cfg.step_epochs * steps_per_epoch))
    if cfg.schedule == Schedule.onecycle:
        return onecycle_factor(after, max(total_steps - warmup, 1))
    return 1.0


ONECYCLE_PCT, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # torch.optim.lr_scheduler.OneCycleLR's defaults


def onecycle_factor(step: int, total_steps: int) -> float:
    """OneCycleLR (cosine, no momentum cycling) as a closed form: lr/25 up to lr over the first 30%
    of the steps, then down to lr/25/1e4 at the last step."""
    initial, final = 1 / ONECYCLE_DIV, 1 / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
    peak = float(ONECYCLE_PCT * total_steps) - 1
    if step <= peak:
        return _cos_between(initial, 1.0, step / peak if peak > 0 else 1.0)
    span = total_steps - 1 - peak
    return _cos_between(1.0, final, min((step - peak) / span, 1.0) if span > 0 else 1.0)


def _cos_between(start: float, end: float, fraction: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def schedule_position(epoch: int, sample_index: int, steps_per_epoch: int, global_batch: int) -> int:
    """Optimizer steps a run with this many steps per epoch has taken at (epoch, sample): where a
    resumed run's schedule continues. Equals the saved step when batch and world size are unchanged."""
    return epoch * steps_per_epoch + math.ceil(sample_index / global_batch)
