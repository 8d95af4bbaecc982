"""The training loop: forward, loss, backward, step; metrics once per logging interval and epoch.

The hot path has no host syncs: per-step loss and accuracy are accumulated on the device and read
back only at ``log.every_steps`` and at the end of each epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from ddp import comm
from ddp.config import Recipe
from ddp.evaluation import evaluate
from ddp.metrics import MetricsWriter
from ddp.parallel import unwrap_model

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; everything a resume needs besides weights and optimizer state."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken


@dataclass
class TrainParts:
    model: nn.Module  # wrapped for parallelism
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    train_loader: DataLoader
    test_loader: DataLoader
    device: torch.device
    state: TrainState = field(default_factory=TrainState)


class Trainer:
    """Runs ``train.epochs`` epochs (or ``train.max_steps`` steps). All ranks must call ``fit``."""

    def __init__(self, recipe: Recipe, parts: TrainParts, metrics: MetricsWriter) -> None:
        self.cfg = recipe
        self.parts = parts
        self.state = parts.state
        self.metrics = metrics

    def fit(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        while self.state.epoch < self.cfg.train.epochs and not self._reached_max_steps():
            last = self._run_epoch(self.state.epoch)
        return last

    def _reached_max_steps(self) -> bool:
        return 0 <= self.cfg.train.max_steps <= self.state.global_step

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        parts = self.parts
        parts.train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        parts.model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=parts.device)  # loss·n, correct, n
        started = time.perf_counter()
        bar = self._progress_bar(epoch)
        for inputs, targets in bar:
            loss = self._run_batch(inputs, targets, sums)
            self.state.global_step += 1
            if self.state.global_step % self.cfg.log.every_steps == 0:
                self._log_step(epoch, loss, bar)
            if self._reached_max_steps():
                break
        bar.close()
        loss_sum, correct, count = comm.all_reduce_sum(sums).tolist()
        seconds = time.perf_counter() - started
        self.state.epoch = epoch + 1
        return self._end_epoch(epoch, loss_sum / max(count, 1), correct / max(count, 1), count, seconds)

    def _run_batch(self, inputs: torch.Tensor, targets: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        inputs = inputs.to(parts.device, non_blocking=True)
        targets = targets.to(parts.device, non_blocking=True)
        logits = parts.model(inputs)
        loss = F.cross_entropy(logits, targets)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        parts.scheduler.step()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == targets).sum()
            sums += torch.stack((loss.double() * targets.numel(), correct.double(),
                                 sums.new_tensor(targets.numel())))
        return loss.detach()

    def _log_step(self, epoch: int, loss: torch.Tensor, bar: tqdm) -> None:
        value = loss.item()  # the one host sync per logging interval
        lr = self.parts.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}", refresh=False)
        self.metrics.write({"kind": "step", "epoch": epoch + 1, "step": self.state.global_step,
                            "loss": value, "lr": lr, "time": time.time()})

    def _end_epoch(self, epoch: int, train_loss: float, train_acc: float, samples: float,
                   seconds: float) -> dict[str, Any]:
        result = evaluate(unwrap_model(self.parts.model), self.parts.test_loader, self.parts.device)
        record = {
            "kind": "epoch", "epoch": epoch + 1, "step": self.state.global_step,
            "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": result.loss, "test_acc": result.accuracy, "test_count": result.count,
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "samples_per_s": samples / seconds if seconds > 0 else 0.0, "epoch_time_s": seconds,
        }
        self.metrics.write(record)
        log.info("epoch %d/%d step %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d samples)"
                 " | %.0f samples/s, %.2f s", epoch + 1, self.cfg.train.epochs, self.state.global_step,
                 train_loss, train_acc, result.loss, result.accuracy, result.count,
                 record["samples_per_s"], seconds)
        return record

    def _progress_bar(self, epoch: int) -> tqdm:
        show = self.cfg.log.progress and comm.is_main()
        return tqdm(self.parts.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                    leave=False, dynamic_ncols=True, disable=None if show else True)
