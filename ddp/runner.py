"""One training run from a resolved recipe: pick devices, build the parts, train, clean up.

``run()`` is what the command line calls: it owns logging and turns failures into exit codes.
``execute()`` raises instead and returns the result; tests and other launchers call it directly.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ddp.cluster import comm
from ddp.cluster.devices import Devices, Placement, check_parallel, choose_backend, place, detect_devices
from ddp.config import Parallel, Recipe
from ddp.model.registry import (Given, build_components, build_loss, build_metrics, check_one_batch, check_recipe,
                                 eval_loss)
from ddp.data.datasets import Splits, build_datasets
from ddp.cluster.environment import ClusterEnv, available_cpus, hostname
from ddp.errors import DDPError, print_error
from ddp.data.loaders import ResumableSampler, ShardSampler, auto_workers, eval_loader, train_loader
from ddp.memory.readers import peak_memory_mb as device_peak_mb, reset_peak_memory
from ddp.memory.resolve import check_budget, resolve_batch_sizes
from ddp.data.device_data import MemoryLoader, choose_loader
from ddp.lifecycle.decision import Decision
from ddp.reporting.logs import RankLogs, rank_logging
from ddp.model.optim import build_optimizer, build_scheduler, schedule_position
from ddp.model.parallel import check_sync_bn, convert_sync_bn, wrap_for_recipe
from ddp.model import sharding
from ddp.checkpoint import full_state
from ddp.model.precision import check_precision, make_scaler
from ddp.reporting.report import summary
from ddp.reporting.text import count
from ddp.lifecycle.run_dir import RunDir
from ddp.engine.seeding import not_deterministic, seed_everything
from ddp.checkpoint.checkpointer import TrainState
from ddp.engine.stop import EXIT_INTERRUPTED
from ddp.engine.trainer import FitResult, Trainer, TrainParts
from ddp.run import Run

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict[str, Any]  # the last epoch record
    state_dict: dict[str, torch.Tensor]  # final unwrapped weights, on CPU (empty when nothing was trained)
    run_dir: Path  # the version directory the run wrote (or would have)
    stopped_by: str | None = None  # the stop signal that ended the run early, if any
    exit_code: int = 0  # 0, or 75 / 130 after a stop signal (see ddp.engine.stop)


@dataclass(frozen=True)
class Plan:
    """What ``prepare`` settled: the run can start."""

    placement: Placement  # backend, device and why (``ddp.cluster.devices``)
    devices: Devices
    threads: int
    splits: Splits
    model: torch.nn.Module  # built (and checked) before the group: the one model this rank trains

    @property
    def backend(self) -> str:
        return self.placement.backend

    @property
    def device(self) -> torch.device:
        return self.placement.device


def run(recipe: Recipe, env: ClusterEnv, given: Given | None = None) -> int:
    """Train with rank-aware logging; return the process exit code (0 on success).

    A refusal (bad backend, missing dataset, an unusable checkpoint or recipe change) prints one
    line on rank 0 and writes no file; a failure during training is logged on the console and in
    the rank's log file; Ctrl-C before training starts ends the run at once with 130.
    """
    try:
        plan = prepare(recipe, env, given=given)
    except DDPError as err:
        print_error(err, env.rank)
        return err.exit_code
    return execute_logged(recipe, env, plan).exit_code


def execute_logged(recipe: Recipe, env: ClusterEnv, plan: Plan) -> RunResult:
    """All ranks must call. ``execute`` with rank-aware logging; failures become ``exit_code``."""
    failed = RunResult(metrics={}, state_dict={}, run_dir=recipe.run_dir, exit_code=1)
    with rank_logging(env.rank, env.world_size, hostname(), recipe.log.level) as logs:
        try:
            return execute(recipe, env, plan, logs)
        except DDPError as err:
            _log_refusal(err, env.rank)
            failed.exit_code = err.exit_code
        except KeyboardInterrupt:
            if env.rank == 0:
                log.warning("interrupted before training started: nothing was saved")
            failed.exit_code = EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - reported, then the process exits non-zero
            refusal = not_deterministic(err)
            if refusal is None:
                _log_failure(err, logs)
            else:
                _log_refusal(refusal, env.rank)
                failed.exit_code = refusal.exit_code
    return failed


def _log_failure(err: Exception, logs: RankLogs) -> None:
    """One console line; the traceback goes to the rank's log file, or to stderr when the failure
    came before the run had a directory (there is no file to hold it then)."""
    if logs.attached:
        log.error("training failed: %s: %s (traceback in %s)", type(err).__name__, err, logs.path, exc_info=True)
        return
    log.error("training failed before it started: %s: %s", type(err).__name__, err)
    traceback.print_exc(file=sys.stderr)


def _log_refusal(err: DDPError, rank: int) -> None:
    """A refusal (exit 2) is the same on every rank: said once, by rank 0. Other errors (a lost
    peer) are said by every rank that saw them."""
    if err.exit_code != 2 or rank == 0 or err.said_by_every_rank:
        log.error("%s", err)


def prepare(recipe: Recipe, env: ClusterEnv, devices: Devices | None = None, given: Given | None = None) -> Plan:
    """Every check that can refuse the run, before any file is written or process group formed:
    the data and the model are built here (``ddp.model.registry``), so a bad name or result is refused."""
    given = given or Given()
    check_recipe(recipe, given)
    placement, devices, threads = place_rank(recipe, env, devices)
    check_precision(recipe.train.precision, placement.device)
    splits, model = build_components(recipe, given, build_datasets)
    check_one_batch(model, splits, build_loss(recipe.train), build_metrics(recipe.train))
    sharding.check_model(model, recipe, env.world_size)  # dist.fsdp_blocks name classes of this model
    check_budget(recipe, env, splits, placement.device, model)  # data.batch_size=auto: the model state must fit the budget
    return Plan(placement, devices, threads, splits, model)


def place_rank(recipe: Recipe, env: ClusterEnv, devices: Devices | None = None) -> tuple[Placement, Devices, int]:
    """This rank's backend, device and CPU threads, checked before any process group forms; seeds
    every RNG from ``train.seed``. Shared by the trainer and ``ddp.setup``."""
    devices = devices or detect_devices()
    check_parallel(recipe.dist.parallel, env)
    placement = place(choose_backend(recipe.dist.backend, env, devices), recipe.dist.parallel, env, devices)
    sharding.check_recipe(recipe, placement.device, env.world_size)
    check_sync_bn(recipe.dist.sync_bn, placement.device, env.world_size)
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    return placement, devices, _set_threads(recipe, env)


def execute(recipe: Recipe, env: ClusterEnv, plan: Plan | None = None, logs: RankLogs | None = None) -> RunResult:
    """All ranks must call. Opens the run (``ddp.run.Run``: process group, run directory, resume
    decision), trains, and returns the outcome. Nothing is written until the run is sure to start."""
    plan = plan or prepare(recipe, env)
    started = time.perf_counter()
    with Run(recipe, env, plan.placement, plan.devices, plan.threads).open(logs, start_logs=False,
                                                                           listen=False) as run:
        if run.finished:
            if comm.is_main():
                log.info("%s", run.finished)
            return RunResult(metrics={}, state_dict={}, run_dir=run.run_dir)
        outcome, step, weights = _train(run, plan)
    run_dir = RunDir(run.run_dir)
    _log_outcome(outcome, step, run_dir, env.rank)  # the group is gone: env knows the rank, comm no longer
    if env.rank == 0:
        log.info("summary\n%s", summary(run_dir.root, time.perf_counter() - started, peak_memory_mb(plan.device)))
    return RunResult(metrics=outcome.last_record, state_dict=weights, run_dir=run_dir.root,
                     stopped_by=outcome.stopped_by, exit_code=outcome.exit_code)


def _train(run: Run, plan: Plan) -> tuple[FitResult, int, dict[str, torch.Tensor]]:
    """All ranks must call. Sizes ``auto`` batches, builds, resumes, records the start, trains:
    (outcome, step, weights)."""
    env = run.env
    run.recipe = recipe = _resolve_batch_sizes(run, plan)
    reset_peak_memory(plan.device)  # the summary's peak memory leaves out the probe's trial steps
    log.info("%s | backend %s, device %s, %d CPU threads per rank | torch %s, python %s",
             env.describe(), plan.backend, plan.device, plan.threads, torch.__version__,
             platform.python_version())
    _log_placement(plan.placement, env.rank)
    parts, state = _start(run, plan)
    if run.logs is not None:
        run.logs.attach(RunDir(run.run_dir).rank_log(env.rank))  # after every refusal: a refused run leaves no file
    trainer = Trainer(recipe, parts, run.metrics, run.checkpointer, run.listen(), state)  # type: ignore[arg-type]
    outcome = trainer.fit()
    if outcome.stopped_by:
        run.record_stop(trainer.state.global_step)
    weights = full_state.whole_weights(trainer.parts.model)  # under FSDP every rank gathers
    return outcome, trainer.state.global_step, weights  # DDP is freed on return, before the group is destroyed


def _log_placement(placement: Placement, rank: int) -> None:
    """Every rank's log says which device it uses and why; GPUs left unused are a warning, said on
    the console once (rank 0)."""
    level = logging.WARNING if placement.warn and rank == 0 else logging.INFO
    log.log(level, "rank %d trains on %s: %s", rank, placement.device, placement.reason)


def _resolve_batch_sizes(run: Run, plan: Plan) -> Recipe:
    """All ranks must call. ``data.batch_size: auto`` → the agreed integers (``ddp.memory``): from
    the checkpoint this run resumes, the probe cache, or trial steps; the recipe then records them."""
    decision = run.decision
    assert decision is not None
    with _abandoned_if_refused(decision):
        resolved = resolve_batch_sizes(run.recipe, run.env, plan, RunDir(decision.run_dir),
                                       checkpoint=decision.checkpoint)
    return resolved


@contextmanager
def _abandoned_if_refused(decision: Decision) -> Iterator[None]:
    """If the block fails, rank 0 removes the directories the decision created (and unlocks), so a
    run refused after deciding leaves nothing behind."""
    try:
        yield
    except BaseException:
        if comm.is_main():
            decision.abandon()
        raise


def _start(run: Run, plan: Plan) -> tuple[TrainParts, TrainState | None]:
    """All ranks must call. Builds the parts and loads the checkpoint (``Run.resume``, which also
    records the start in the run directory). A failure on one rank (a dataset that will not load,
    a checkpoint this node cannot read) is raised on every rank before the next collective, so no
    rank waits for it until ``dist.timeout_s``."""
    recipe = run.recipe
    assert run.decision is not None
    with _abandoned_if_refused(run.decision):
        with comm.all_or_none("building the model and data"):
            parts = build_parts(recipe, plan, wrap=False)
        parts.model = parts.rewrap(parts.model)  # type: ignore[misc]  # collective: DDP broadcasts rank 0's weights
        state = run.resume(parts.model, parts.optimizer, scaler=parts.scaler)
    if not run.resumed:
        return parts, None
    parts.scheduler = _scheduler(recipe, parts, state)
    return parts, state


def _log_outcome(outcome: FitResult, step: int, run_dir: RunDir, rank: int) -> None:
    """Said once on the console (rank 0); every rank's log file has it."""
    if outcome.stopped_by:
        log.log(logging.WARNING if rank == 0 else logging.INFO, "stopped by %s at step %d; checkpoint saved in %s. "
                "Exit code %d: run the same command to resume", outcome.stopped_by, step, run_dir.checkpoints,
                outcome.exit_code)
    else:
        acc = outcome.last_record.get("test_acc")
        log.info("done: %s after %s; run dir %s", f"test accuracy {acc:.4f}" if acc is not None else
                 f"test loss {outcome.last_record.get('test_loss', float('nan')):.4f}", count(step, "step"),
                 run_dir.root)


def build_parts(recipe: Recipe, plan: Plan, wrap: bool = True) -> TrainParts:
    """All ranks must call (wrapping in DDP broadcasts rank 0's weights). With ``wrap=False`` nothing
    here communicates and ``parts.model`` is the plain model: ``parts.rewrap`` wraps it."""
    splits, device = plan.splits, plan.device
    model = convert_sync_bn(plan.model, recipe.dist.sync_bn, comm.world_size())
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not (recipe.dist.parallel == Parallel.fsdp and comm.world_size() > 1):  # FSDP moves it block by block
        model = model.to(device)
    train, test, how = _loaders(recipe, plan)
    optimizer = build_optimizer(model, recipe.optim, trainable_only=recipe.model.unfreeze_after_epochs < 0)
    rewrap = partial(_wrap, recipe=recipe, plan=plan, optimizer=optimizer)
    parts = TrainParts(rewrap(model) if wrap else model, optimizer, None, train, test, device,  # type: ignore[arg-type]
                       loss=build_loss(recipe.train), eval_loss=eval_loss(recipe.train),
                       rewrap=rewrap,
                       scaler=make_scaler(recipe.train.precision, device), metrics=build_metrics(recipe.train))
    parts.scheduler = _scheduler(recipe, parts, None)
    log.info("%d train / %d test samples, %s per epoch at %d per rank × %s, %s", len(splits.train),
             len(splits.test), count(len(train), "step"), recipe.data.batch_size, count(comm.world_size(), "rank"), how)
    return parts


def _wrap(model: torch.nn.Module, recipe: Recipe, plan: Plan, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """All ranks must call. DDP (or DP) around the model, or FSDP's shards of it (the optimizer
    then steps the sharded parameters), then ``torch.compile`` when asked."""
    wrapped = wrap_for_recipe(model, recipe, plan.device, plan.devices, optimizer)
    return torch.compile(wrapped) if recipe.train.compile else wrapped


def _scheduler(recipe: Recipe, parts: TrainParts, state: TrainState | None) -> LambdaLR:
    """The recipe's LR schedule, placed where ``state`` stands (a resumed run continues the schedule
    of ITS recipe: more epochs stretch it, a new lr rescales it)."""
    steps_per_epoch = -(-len(parts.train_loader) // recipe.train.accumulate)  # optimizer steps
    total = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps >= 0:
        total = min(total, recipe.train.max_steps)
    start = 0
    if state is not None:
        start = schedule_position(state.epoch, state.sample_index, steps_per_epoch,
                                  recipe.data.batch_size * comm.world_size() * recipe.train.accumulate)
    return build_scheduler(parts.optimizer, recipe.optim, steps_per_epoch, max(total, 1), start)


def _loaders(recipe: Recipe, plan: Plan) -> tuple[Any, Any, str]:
    """(train, test, description): in-memory batches or DataLoaders over the same samplers."""
    data, rank, world = recipe.data, comm.rank(), comm.world_size()
    sampler = ResumableSampler(plan.splits.train, world, rank, recipe.train.seed)
    if choose_loader(data.loader, plan.splits, plan.device, data.memory_limit_mb):
        tensors = plan.splits.materialise()  # type: ignore[misc]
        on = {name: t.to(plan.device) for name, t in vars(tensors).items() if isinstance(t, torch.Tensor)}
        train = MemoryLoader(on["train_x"], on["train_y"], sampler, data.batch_size, tensors.augment,
                             recipe.train.seed)
        test = MemoryLoader(on["test_x"], on["test_y"], ShardSampler(len(tensors.test_y), rank, world),
                            data.eval_batch_size)
        return train, test, f"in-memory batches on {plan.device}"
    workers = auto_workers(data.num_workers, plan.splits.in_memory, plan.threads)
    train = train_loader(plan.splits.train, data.batch_size, sampler, recipe.train.seed + rank, plan.device,
                         workers)
    test = eval_loader(plan.splits.test, data.eval_batch_size, rank, world, plan.device, workers)
    return train, test, f"DataLoader with {count(workers, 'worker')}"


def _set_threads(recipe: Recipe, env: ClusterEnv) -> int:
    """Give each rank its share of the cores (torchrun's default is 1 thread per rank)."""
    threads = recipe.dist.threads_per_rank or max(1, available_cpus() // env.local_world_size)
    if torch.get_num_threads() != threads:
        log.debug("CPU threads per rank: %d → %d", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads



def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory since its batch sizes were settled (so without the memory probe's
    trial steps): the peak CUDA allocation on a GPU, the peak resident memory on the CPU."""
    return device_peak_mb(device)
