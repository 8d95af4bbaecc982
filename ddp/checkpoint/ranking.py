"""Which checkpoint is ``best``: the epoch record's field that ranks it (``checkpoint.best_metric``,
``auto`` resolved) and which way is better (``checkpoint.best_mode``)."""

from __future__ import annotations

from typing import Any

from ddp.config import BestMode, CheckpointConfig


def better(value: float, than: float | None, mode: BestMode) -> bool:
    if than is None:
        return True
    return value > than if mode == BestMode.max else value < than


AUTO_RANKING = (("test_acc", BestMode.max), ("accuracy", BestMode.max), ("test_loss", BestMode.min),
                ("loss", BestMode.min))  # checkpoint.best_metric=auto: the first a run reports


def ranking(record: dict[str, Any], cfg: CheckpointConfig) -> tuple[str, float | None, BestMode]:
    """(field, value, which way is better) of the epoch record that ranks its checkpoint.
    ``checkpoint.best_metric=auto`` takes accuracy when the run reports it (classification),
    else the loss (lower is better), so a regression run has a ``best`` too."""
    if cfg.best_metric != "auto":
        return cfg.best_metric, record.get(cfg.best_metric), cfg.best_mode
    for name, mode in AUTO_RANKING:
        if record.get(name) is not None:
            return name, float(record[name]), mode
    return cfg.best_metric, None, cfg.best_mode
