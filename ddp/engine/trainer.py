"""The training loop: forward, loss, backward, step; metrics once per logging interval and epoch.

The hot path has no host syncs: per-step loss and accuracy are accumulated on the device and read
back only at ``log.every_steps`` and at the end of each epoch. Checkpoints are taken at step and
epoch boundaries (``checkpoint.every_steps`` / ``checkpoint.every_epochs``), at the end, and when a
preemption signal asks every rank to stop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from ddp.cluster import comm, progress
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.checkpoint.ranking import ranking
from ddp.model.registry import classifies
from ddp.config import Recipe
from ddp.engine.evaluation import evaluate
from ddp.engine.rng import capture_rng, restore_rng
from ddp.model.finetune import unfreeze
from ddp.reporting.metrics import MetricsWriter
from ddp.model.parallel import unwrap_model
from ddp.model.sharding import gradient_sync_off, is_sharded
from ddp.model.precision import autocast
from ddp.engine.stop import StopRequest

log = logging.getLogger(__name__)


@dataclass
class TrainParts:
    model: nn.Module  # wrapped for parallelism
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    train_loader: DataLoader
    test_loader: DataLoader
    device: torch.device
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy  # batch mean
    eval_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # None: exact cross entropy
    rewrap: Callable[[nn.Module], nn.Module] | None = None  # wraps the plain model again (after unfreezing)
    scaler: Any = None  # torch.amp.GradScaler for train.precision=fp16 (CUDA); None otherwise
    metrics: Callable[[torch.Tensor, torch.Tensor], Any] | None = None  # train.metrics: reported as test_<name>


@dataclass
class FitResult:
    last_record: dict[str, Any]  # the newest epoch record
    stopped_by: str | None  # the signal that stopped training early, if any
    exit_code: int = 0  # after a stop signal: 75 (preemption) or 130 (Ctrl-C)


class Trainer:
    """Runs ``train.epochs`` epochs (or ``train.max_steps`` steps). All ranks must call ``fit``."""

    def __init__(self, recipe: Recipe, parts: TrainParts, metrics: MetricsWriter, checkpointer: Checkpointer,
                 stop: StopRequest, state: TrainState | None = None) -> None:
        self.cfg = recipe
        self.parts = parts
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.stop = stop
        self.state = state or TrainState()
        self._saved_step = self.state.global_step if state else -1
        self._classifies = True  # outputs were class logits in every batch so far: accuracy is reported
        self._group = (0, 1)  # (micro-batch index, micro-batches in this optimizer step)
        self._prime = state is not None and state.global_step > 0  # resumed: see _prime_buckets

    def fit(self) -> FitResult:
        """All ranks must call. A run already finished under its recipe never gets here
        (``ddp.lifecycle.decision`` says so instead)."""
        while not self.finished():
            if self._run_epoch(self.state.epoch):
                self._save()
                return FitResult(self.state.last_record, self.stop.name, self.stop.exit_code)
        if self._saved_step != self.state.global_step:
            self._save()
        return FitResult(self.state.last_record, None)

    def finished(self) -> bool:
        return self.state.epoch >= self.cfg.train.epochs or self._reached_max_steps()

    def _reached_max_steps(self) -> bool:
        return 0 <= self.cfg.train.max_steps <= self.state.global_step

    def _run_epoch(self, epoch: int) -> bool:
        """One epoch (or its remainder after a resume). True when a stop signal interrupted it."""
        parts, state = self.parts, self.state
        self._maybe_unfreeze(epoch)
        parts.train_loader.sampler.set_epoch(epoch, state.sample_index)  # type: ignore[attr-defined]
        parts.model.train()
        sums = torch.tensor(state.partial_sums, dtype=torch.float64, device=parts.device)
        started, total, complete = time.perf_counter(), len(parts.train_loader), True
        bar = self._progress_bar(epoch)
        accumulate = self.cfg.train.accumulate
        for done, (inputs, targets) in enumerate(progress.track(bar), 1):
            micro = (done - 1) % accumulate  # micro-batch within its optimizer step
            self._group = (micro, min(accumulate, total - done + 1 + micro))
            loss = self._run_batch(inputs, targets, sums)
            state.sample_index += targets.shape[0] * comm.world_size()
            if micro + 1 < self._group[1]:
                continue  # gradients accumulate; no step, no save, no stop between micro-batches
            state.global_step += 1
            progress.step_done(state.global_step)
            if state.global_step % self.cfg.log.every_steps == 0:
                self._log_step(epoch, loss, bar)
            if self.stop.poll():
                bar.close()
                state.partial_sums = sums.tolist()
                log.log(logging.WARNING if comm.is_main() else logging.INFO,  # once on the console
                        "stop requested by %s: checkpointing at step %d", self.stop.name, state.global_step)
                return True
            if self._reached_max_steps() and done < total:
                complete = False
                break
            if self._step_save_due(done, total):
                state.partial_sums = sums.tolist()
                self._save()
        bar.close()
        state.partial_sums = sums.tolist()
        totals = comm.all_reduce_sum(sums.clone()).tolist()
        self._end_epoch(epoch, totals, time.perf_counter() - started, complete)
        return False

    def _run_batch(self, inputs: torch.Tensor, targets: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        inputs = inputs.to(parts.device, non_blocking=True)
        targets = targets.to(parts.device, non_blocking=True)
        if self.cfg.train.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        micro, size = self._group
        if self._prime:
            self._prime_buckets(inputs, targets)
        if micro == 0:
            parts.optimizer.zero_grad(set_to_none=True)
        last = micro + 1 == size
        with contextlib.nullcontext() if last else _no_sync(parts.model):  # DDP/FSDP reduce on the last only
            with autocast(self.cfg.train.precision, parts.device):
                logits = parts.model(inputs)
                loss = parts.loss(logits, targets)
            scaled = loss / size if size > 1 else loss
            (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
        if last:
            self._step()
        with torch.no_grad():
            self._classifies = self._classifies and classifies(logits, targets)
            correct = (logits.argmax(dim=1) == targets).sum() if self._classifies else loss.new_zeros(())
            count = targets.shape[0]  # a host int: new_full fills on the device, new_tensor would copy from host
            sums += torch.stack((loss.double() * count, correct.double(), sums.new_full((), count)))
        return loss.detach()

    def _prime_buckets(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """All ranks must call, on the first batch after a resume. Makes that batch's step all-reduce
        in the same gradient buckets as the uninterrupted run's, so the resumed run stays bit for bit.

        DDP starts with one bucket and regroups the gradients by the order they became ready after
        its first backward. Ring all-reduce sums each element in an order set by its place in the
        bucket, so with more than 2 ranks the first step after a restart, still in the first
        layout, would round differently from the uninterrupted run's step. One throw-away
        forward and backward here lets DDP regroup first (two with ``dist.static_graph``: DDP
        records the order in its second backward then); the RNG states, the buffers (BatchNorm
        statistics) and the gradients are put back as they were, so training sees nothing of it."""
        self._prime = False
        model = self.parts.model
        if not isinstance(model, nn.parallel.DistributedDataParallel) or comm.world_size() < 3:
            return  # two summands add the same in either order
        rng = capture_rng()
        buffers = [buffer.detach().clone() for buffer in model.buffers()]
        for _ in range(2 if model.static_graph else 1):
            with autocast(self.cfg.train.precision, self.parts.device):
                loss = self.parts.loss(model(inputs), targets)
            loss.backward()
            self.parts.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        restore_rng(rng)

    def _step(self) -> None:
        parts = self.parts
        if parts.scaler is not None:
            parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the scaled ones
        if self.cfg.train.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(parts.model.parameters(), self.cfg.train.clip_grad_norm)
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)  # skipped when the gradients overflowed
            parts.scaler.update()
        else:
            parts.optimizer.step()
        parts.scheduler.step()

    def _step_save_due(self, done: int, total: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        if not every or self.state.global_step % every:
            return False
        return done < total  # the epoch's last step is covered by the epoch-end save

    def _log_step(self, epoch: int, loss: torch.Tensor, bar: tqdm) -> None:
        value = loss.item()  # the one host sync per logging interval
        lr = self.parts.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}", refresh=False)
        self.metrics.write({"kind": "step", "epoch": epoch + 1, "step": self.state.global_step,
                            "loss": value, "lr": lr, "time": time.time()})

    def _end_epoch(self, epoch: int, totals: list[float], seconds: float, complete: bool) -> None:
        """Evaluate and record. An epoch cut short by ``train.max_steps`` is recorded as partial and
        stays open, so a later run with more steps resumes inside it."""
        loss_sum, correct, count = totals
        result = evaluate(unwrap_model(self.parts.model), self.parts.test_loader, self.parts.device,
                          self.parts.eval_loss, self.parts.metrics)
        record = {
            "kind": "epoch", "epoch": epoch + 1, "step": self.state.global_step,
            "train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1) if self._classifies else None,
            "test_loss": result.loss, "test_acc": result.accuracy, "test_count": result.count,
            **{f"test_{name}": value for name, value in result.metrics.items()},
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "samples_per_s": count / seconds if seconds > 0 else 0.0, "epoch_time_s": seconds,
        }
        if not complete:
            record["partial"] = True
        self.metrics.write(record)
        extra = "".join(f" {name} {value:.4f}" for name, value in result.metrics.items())
        log.info("epoch %d/%d step %d%s: train loss %.4f%s | test loss %.4f%s%s (%d samples)"
                 " | %.0f samples/s, %.2f s", epoch + 1, self.cfg.train.epochs, self.state.global_step,
                 "" if complete else " (max_steps)", record["train_loss"], _acc(record["train_acc"]),
                 result.loss, _acc(result.accuracy), extra, result.count, record["samples_per_s"], seconds)
        self.state.last_record = record
        if not complete:
            return
        self.state.epoch, self.state.sample_index, self.state.partial_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        every = self.cfg.checkpoint.every_epochs
        if every and (self.state.epoch % every == 0 or self.finished()):
            self._save()

    def _maybe_unfreeze(self, epoch: int) -> None:
        """All ranks must call. From epoch ``model.unfreeze_after_epochs`` on, the frozen layers train:
        DDP is rebuilt, since it only synchronises parameters that required grad when it was made;
        FSDP follows ``requires_grad`` as it changes, so a sharded model stays as it is."""
        after = self.cfg.model.unfreeze_after_epochs
        if after < 0 or epoch < after:
            return
        model = unwrap_model(self.parts.model)
        if unfreeze(model) and self.parts.rewrap is not None:
            if not is_sharded(model):
                self.parts.model = self.parts.rewrap(model)
            if comm.is_main():
                log.info("epoch %d: model.unfreeze_after_epochs=%d, every layer trains from now on", epoch + 1, after)

    def _save(self) -> None:
        """All ranks must call."""
        name, metric, mode = ranking(self.state.last_record, self.cfg.checkpoint)
        if self.state.sample_index:
            metric = None  # a mid-epoch checkpoint has no evaluation of its own
        self.checkpointer.save(self.parts.model, self.parts.optimizer, self.parts.scheduler, self.state, metric,
                               self.parts.scaler, mode, name)
        self._saved_step = self.state.global_step

    def _progress_bar(self, epoch: int) -> tqdm:
        show = self.cfg.log.progress and comm.is_main()
        return tqdm(self.parts.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                    leave=False, dynamic_ncols=True, disable=None if show else True)


def _acc(value: float | None) -> str:
    return "" if value is None else f" acc {value:.4f}"


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` or FSDP's ``set_requires_gradient_sync(False)`` (gradients stay local
    until the group's last micro-batch); a no-op otherwise."""
    if is_sharded(model):
        return gradient_sync_off(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
