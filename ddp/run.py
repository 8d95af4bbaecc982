"""Your own training loop on this project's runtime: ``run = ddp.setup()``.

``setup`` does what ``python -m ddp.train`` does before its first step — finds the launcher
(torchrun, srun, ``launch node``, plain python), picks the backend, device and network interface,
forms the process group, decides the run's version directory (resuming the newest one when it
was interrupted) and starts rank-aware logs. The ``Run`` it returns gives the loop the rest::

    run = ddp.setup(epochs=10)
    model, optimizer = run.prepare(model, optimizer)     # on this rank's device, wrapped in DDP
    train = run.loader(train_set, batch_size=64)         # this rank's shard, reshuffled every epoch
    run.resume(model, optimizer)                         # the newest checkpoint of this run, if any
    for epoch in run.epochs():
        for x, y in train:
            ...                                          # your step
            if run.should_stop():                        # SIGTERM, SIGUSR1/2, Ctrl-C: agreed by all ranks
                run.save(model, optimizer)
                run.exit()
        run.log(epoch=epoch + 1, **run.evaluate(model, test_set))
        run.save(model, optimizer)
    run.close()

Every method that communicates says so ("all ranks must call"); ``ddp.fit`` and
``python -m ddp.train`` run on the same ``Run`` (``ddp.runner``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddp.checkpoint import files
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.checkpoint.ranking import ranking
from ddp.cluster import comm, progress
from ddp.cluster.devices import Devices, Placement
from ddp.cluster.environment import ClusterEnv, hostname, job_attempt
from ddp.cluster.nccl import DUMP_SUBDIR, make_dump_dir
from ddp.cluster.process_group import process_group
from ddp.config import Recipe
from ddp.data.loaders import EpochLoader, ResumableSampler, ShardSampler, auto_workers
from ddp.engine.evaluation import LossFn, MetricFn, evaluate, mean_over_samples
from ddp.engine.stop import StopRequest
from ddp.lifecycle import lock
from ddp.lifecycle.changes import Policy, describe
from ddp.lifecycle.decision import Decision, decide
from ddp.lifecycle.history import record_start, record_stop
from ddp.lifecycle.run_dir import RunDir
from ddp.model import sharding
from ddp.model.parallel import convert_sync_bn, unwrap_model, wrap_for_recipe
from ddp.reporting.logs import RankLogs, rank_logging
from ddp.reporting.metrics import MetricsWriter

log = logging.getLogger(__name__)


class Run:
    """One rank's share of a run. Made by ``ddp.setup`` (or ``Run.open``); use it as a context
    manager or call ``close``. Properties are safe to read on any rank at any time."""

    def __init__(self, recipe: Recipe, env: ClusterEnv, placement: Placement, devices: Devices,
                 threads: int) -> None:
        self.recipe, self.env, self.placement, self.devices, self.threads = recipe, env, placement, devices, threads
        self.state = TrainState()  # where training stands: set by resume, advanced by the loop
        self.decision: Decision | None = None
        self._checkpointer: Checkpointer | None = None
        self.stop: StopRequest | None = None
        self.logs: RankLogs | None = None
        self.metrics: MetricsWriter | None = None
        self._stack = ExitStack()
        self._loaders: list[EpochLoader] = []
        self._began = False
        self._resumed = False

    # --- what this rank is ------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0: the rank that writes files and speaks on the console."""
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def backend(self) -> str:
        return self.placement.backend

    @property
    def run_dir(self) -> Path:
        """This run's version directory (``runs/<name>/version_N``)."""
        assert self.decision is not None, "Run.open() first"
        return self.decision.run_dir

    @property
    def finished(self) -> str:
        """Non-empty when the named checkpoint already reached ``train.epochs``: nothing to train."""
        return self.decision.done if self.decision else ""

    @property
    def step(self) -> int:
        """Optimizer steps taken (counted on every optimizer given to ``prepare``)."""
        return self.state.global_step

    # --- opening and closing ----------------------------------------------------------------

    def open(self, logs: RankLogs | None = None, *, start_logs: bool = True, listen: bool = True) -> Run:
        """All ranks must call. Forms the process group, decides the version directory (rank 0,
        told to all) and starts this rank's log file in it. A refusal raises ``DDPError`` on every
        rank, with nothing written. ``logs``: the rank logging already running (else it starts here,
        unless ``start_logs`` is false); ``listen``: take stop signals from now on (else ``listen()``)."""
        try:
            if logs is None and start_logs:
                logs = self._stack.enter_context(
                    rank_logging(self.rank, self.world_size, hostname(), self.recipe.log.level))
            self.logs = logs
            self._form_group()
            self.decision = _decide(self.recipe)
            if self.decision.done and self.is_main and start_logs:
                log.info("%s", self.decision.done)
            if not self.decision.done:
                self._stack.callback(lock.release, self.decision.run_dir)
                if start_logs and self.logs is not None:  # a caller with its own logs attaches them itself
                    self.logs.attach(RunDir(self.decision.run_dir).rank_log(self.rank))
            if listen:
                self.listen()
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def listen(self) -> StopRequest:
        """All ranks must call (it forms a group), once. From here SIGTERM, SIGUSR1/2 and Ctrl-C
        ask for a stop that ``should_stop`` agrees on, instead of ending the process."""
        if self.stop is None:
            self.stop = StopRequest(self.recipe.dist.timeout_s, self.recipe.checkpoint.signal_poll_s).install()
            self.stop.saves = self._checkpointer
            self._stack.push(self._close_stop)
        return self.stop

    @property
    def checkpointer(self) -> Checkpointer:
        """Made on first use, from the recipe as it is then (``auto`` batch sizes resolved)."""
        if self._checkpointer is None:
            assert self.decision is not None and not self.decision.done, "the run is finished: nothing to save"
            self._checkpointer = Checkpointer(self.recipe.checkpoint, RunDir(self.decision.run_dir).checkpoints,
                                              self.recipe)
            self._stack.push(self._finish_saves)  # before the group goes: it may still be writing
            if self.stop is not None:
                self.stop.saves = self._checkpointer  # a failed background save is agreed on at a poll
        return self._checkpointer

    @property
    def resumed(self) -> bool:
        """True once ``resume`` loaded a checkpoint."""
        return self._resumed

    def _form_group(self) -> None:
        plan, recipe = self.placement, self.recipe
        gpu = self.devices.identity(plan.gpu) if plan.gpu is not None else None
        dumps = recipe.run_dir / DUMP_SUBDIR
        self._stack.enter_context(process_group(self.env, plan.backend, plan.device, recipe.dist.timeout_s, recipe,
                                                gpu=gpu, nccl_dumps=dumps))
        if plan.backend == "nccl":
            make_dump_dir(dumps)

    def _finish_saves(self, kind: Any, error: Any, trace: Any) -> bool:
        """On a clean close every rank waits for the save in flight (raising its failure); after an
        error the ranks do not wait for each other, and a torn save is never published."""
        if error is None and self._checkpointer is not None:
            self._checkpointer.finish()
        return False

    def _close_stop(self, kind: Any, error: Any, trace: Any) -> bool:
        if self.stop is not None:
            self.stop.close(abandon=error is not None)  # after an error, peers may be gone: no last poll
        return False

    def close(self) -> None:
        """All ranks must call (last). Waits for the other ranks, tears the group down, closes the
        log and metric files and releases the run directory."""
        if self.metrics is not None:
            self.metrics.close()
        self._stack.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.metrics is not None:
            self.metrics.close()
        return bool(self._stack.__exit__(*exc))

    def exit(self) -> None:
        """All ranks must call, after ``save`` once ``should_stop`` said yes: close, then exit with
        the stop's code (75 for a preemption, so Slurm requeues; 130 for Ctrl-C)."""
        code = self.stop.exit_code if self.stop is not None else 0
        log.log(logging.WARNING if self.is_main else logging.INFO,
                "stopped by %s at step %d; run the same command to resume", self.stop.name if self.stop else "?",
                self.step)
        self.record_stop(self.step)
        self.close()
        raise SystemExit(code)

    def record_stop(self, step: int) -> None:
        """All ranks must call, after the stop's save at ``step``. Once the save in flight is
        durable (its failure raised on every rank), rank 0 records the stop in ``history.jsonl``,
        while the run still holds its directory, when the newest checkpoint is of ``step``: a loop
        that exits without saving first has nothing to resume from here."""
        if self._checkpointer is not None:
            self._checkpointer.finish()
        if not self.is_main or self.decision is None or self.stop is None:
            return
        run_dir = RunDir(self.decision.run_dir)
        if files.latest_step(run_dir.checkpoints) == step:
            record_stop(run_dir, self.stop.name, step, self.stop.exit_code)

    # --- the model and the data -------------------------------------------------------------

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """All ranks must call (DDP broadcasts rank 0's weights; FSDP shards). Moves ``model`` to
        this rank's device and wraps it as ``dist.parallel`` says; returns the model, or (model,
        optimizer). Make the optimizer before (and pass it here) or after: under FSDP, which
        replaces the parameters with their shards, the optimizer passed is pointed at them.
        Optimizer steps are counted from here (``run.step``)."""
        model = convert_sync_bn(model, self.recipe.dist.sync_bn, self.world_size)
        sharding.check_model(model, self.recipe, self.world_size)
        wrapped = wrap_for_recipe(model, self.recipe, self.device, self.devices, optimizer)
        if optimizer is None:
            return wrapped
        optimizer.register_step_post_hook(self._count_step)
        return wrapped, optimizer

    def _count_step(self, *_: Any) -> None:
        self.state.global_step += 1
        progress.step_done(self.state.global_step)

    def loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, num_workers: int = -1,
               **options: Any) -> EpochLoader:
        """This rank's share of ``dataset`` in batches of ``batch_size`` (per rank), on its device.

        ``shuffle=True`` (training): a new order every pass, the same on every rank and after a
        resume, padded so every rank takes as many steps; a save mid-epoch resumes at the next
        sample. ``shuffle=False`` (evaluation): every sample exactly once over all ranks, no
        padding. ``num_workers=-1``: none for tensors in memory, else up to one per spare core.
        Other ``options`` go to ``torch.utils.data.DataLoader``."""
        seed, rank, world = self.recipe.train.seed, self.rank, self.world_size
        sampler = (ResumableSampler(dataset, world, rank, seed) if shuffle
                   else ShardSampler(len(dataset), rank, world))  # type: ignore[arg-type]
        workers = auto_workers(num_workers, isinstance(dataset, torch.utils.data.TensorDataset), self.threads)
        options.setdefault("pin_memory", self.device.type == "cuda")
        options.setdefault("persistent_workers", workers > 0)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed + rank), **options)
        tracked = EpochLoader(loader, sampler, self.device, world)
        if shuffle:
            tracked.place(self.state.epoch, self.state.sample_index)
            self._loaders.append(tracked)
        return tracked

    def epochs(self) -> Iterator[int]:
        """The epochs left: from the resumed one up to ``train.epochs`` (``setup(epochs=N)``)."""
        if self.finished:
            return iter(())
        return iter(range(self.state.epoch, self.recipe.train.epochs))

    # --- checkpoints ------------------------------------------------------------------------

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
               scaler: Any = None) -> TrainState:
        """All ranks must call. Loads the checkpoint this run continues (the newest valid one of an
        interrupted run, or ``train.resume=<path>``) into the model, optimizer, your LR scheduler
        and grad scaler, restores every rank's RNG, and places the loaders where it stopped.
        Returns the state (``.epoch``, ``.global_step``); a fresh run returns epoch 0, step 0."""
        assert self.decision is not None, "Run.open() first"
        if self.finished:  # said once by rank 0 at open; run.epochs() is then empty
            return self.state
        with comm.all_or_none("loading the checkpoint"):
            state = self.checkpointer.resume(self.decision.checkpoint, model, optimizer, scaler, scheduler)
        if state is not None:
            self.state, self._resumed = state, True
            for loader in self._loaders:
                loader.place(state.epoch, state.sample_index)
        self._begin()
        return self.state

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             scaler: Any = None, *, metric: float | None = None) -> Path:
        """All ranks must call. Writes a checkpoint of where the loop stands (rank 0 writes, atomically, or
        every rank its shards (``checkpoint.format``);
        the newest ``checkpoint.keep`` are kept, and ``best`` by the last logged metrics), and returns
        its directory. Mid-epoch (after ``should_stop``) it records the sample to resume at."""
        self._begin()
        self._sync_position()
        name, mode = None, None
        if metric is None and self.state.sample_index == 0:
            name, metric, mode = ranking(self.state.last_record, self.recipe.checkpoint)
        self.checkpointer.save(model, optimizer, scheduler, self.state, metric, scaler, mode, name)
        return self.checkpointer.directory

    def _sync_position(self) -> None:
        """The epoch and sample position from the training loader (the first one made)."""
        if self._loaders:
            self.state.epoch, self.state.sample_index = self._loaders[0].epoch, self._loaders[0].consumed

    # --- stopping, evaluating, logging ------------------------------------------------------

    def should_stop(self) -> bool:
        """All ranks must call, after every optimizer step. True (on every rank at the same step)
        once any rank received SIGTERM, SIGUSR1, SIGUSR2 or Ctrl-C: then ``save`` and ``exit``."""
        return self.listen().poll()

    def evaluate(self, model: nn.Module, data: Dataset | Iterable, metric_fn: MetricFn | None = None, *,
                 loss_fn: LossFn | None = None, batch_size: int = 512) -> dict[str, float]:
        """All ranks must call. Exact over ``data`` (a Dataset, or ``run.loader(..., shuffle=False)``):
        every sample counted once whatever the world size. Without ``metric_fn``: ``loss`` (cross
        entropy, or ``loss_fn``) and ``accuracy`` when the outputs are class logits. With it:
        ``metric_fn(outputs, targets)`` → {name: one value per sample, or the batch mean}, each
        averaged over all samples (plus ``loss`` when ``loss_fn`` is given). Always ``count``."""
        loader = data if not isinstance(data, Dataset) else self.loader(data, batch_size, shuffle=False)
        plain = unwrap_model(model)
        if metric_fn is None:
            result = evaluate(plain, loader, self.device, loss_fn)
            out = {"loss": result.loss, "count": result.count}
            if result.accuracy is not None:
                out["accuracy"] = result.accuracy
            return out

        def per_batch(outputs: torch.Tensor, targets: torch.Tensor) -> Mapping[str, Any]:
            values = dict(metric_fn(outputs, targets))
            if loss_fn is not None:
                values["loss"] = loss_fn(outputs, targets)
            return values

        means, count = mean_over_samples(plain, loader, self.device, per_batch)
        return {**means, "count": count}

    def log(self, **values: Any) -> None:
        """Any rank may call; rank 0 writes. One record in ``metrics.jsonl`` (and TensorBoard) at
        the current step, with ``kind`` ``epoch`` when ``epoch`` is among the values; the last
        record with ``epoch`` ranks the next checkpoint (``checkpoint.best_metric``)."""
        self._begin()
        record = {"kind": "epoch" if "epoch" in values else "step", "step": self.step, **values, "time": time.time()}
        record = {key: _plain(value) for key, value in record.items()}
        if "epoch" in values:
            self.state.last_record = record
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            log.info("step %d: %s", self.step, shown)
        assert self.metrics is not None
        self.metrics.write(record)

    def _begin(self) -> None:
        """Once, when the loop first resumes, saves or logs: rank 0 records the start in the run
        directory; the metrics file is opened (truncated after the resumed step)."""
        if self._began:
            return
        self._began = True
        assert self.decision is not None
        run_dir = RunDir(self.decision.run_dir)
        resumed = self.state.global_step if self._resumed else None
        self.metrics = MetricsWriter(run_dir.metrics, run_dir.tensorboard if self.recipe.log.tensorboard else None,
                                     self.is_main, resumed)
        if not self.is_main:
            return
        if self.decision.notice:
            log.info("%s", self.decision.notice)
        if any(c.policy == Policy.honoured for c in self.decision.changes):
            log.info("resuming with changes: %s", describe(list(self.decision.changes)))
        log.info("run dir %s", run_dir.root)
        record_start(run_dir, self.recipe, self.decision.checkpoint, self.state.global_step, self.state.epoch,
                     self.decision.changes, self.world_size)


def _plain(value: Any) -> Any:
    """A 0-d tensor as a number, for JSON."""
    return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def _decide(recipe: Recipe) -> Decision:
    """All ranks must call: rank 0 decides (``ddp.lifecycle.decision``) and tells the others; any
    failure there (a refusal, an unwritable run dir) is raised on every rank. A restarted or requeued
    job continues its own version (``job_attempt``)."""
    choice: Any = None
    with comm.all_or_none("deciding the run directory"):
        if comm.is_main():
            choice = decide(recipe, job_attempt())
    return comm.broadcast_object(choice)


def setup(recipe: str | Path | None = None, *, name: str | None = None, epochs: int | None = None,
          **overrides: Any) -> Run:
    """All ranks must call. The run for your own loop, open: process group formed, version
    directory chosen, logs started. ``recipe``: a YAML file for the keys this uses (``run``,
    ``train.epochs/seed/resume/deterministic``, ``dist``, ``checkpoint``, ``log``); ``name``: the
    run's name (default: your script's name; runs go to ``runs/<name>/version_N``); ``epochs``:
    how many your loop trains (``run.epochs()``; a rerun of a finished run starts a new version);
    ``overrides``: recipe keys with ``__`` for ``.``, e.g. ``dist__backend="gloo"``.

    A refusal (bad key, no GPU for nccl, an unusable checkpoint) prints one line on rank 0 and
    raises ``SystemExit(2)`` on every rank, before anything is written."""
    from ddp.api import build_run  # the checks the command line makes, shared with ddp.fit

    items = {"model__name": "own", "data__name": "own"}
    if name is not None or (recipe is None and "run__name" not in overrides):
        items["run__name"] = name or _script_name()
    if epochs is not None:
        items["train__epochs"] = epochs
    return build_run(recipe, {**items, **overrides})


def _script_name() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else "interactive"


