"""One training run from a resolved recipe: pick devices, build the parts, train, clean up.

``run()`` is what the command line calls: it owns logging and turns failures into exit codes.
``execute()`` raises instead and returns the result; tests and other launchers call it directly.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from typing import Any

import torch

from ddp import comm
from ddp.backend import Devices, check_parallel, choose_backend, choose_device, probe_devices
from ddp.config import Recipe, to_yaml
from ddp.datasets import Splits, build_datasets
from ddp.environment import ClusterEnv, available_cpus, hostname
from ddp.errors import DDPError, print_error
from ddp.loaders import ResumableSampler, ShardSampler, auto_workers, eval_loader, train_loader
from ddp.memory_loader import MemoryLoader, choose_loader
from ddp.logs import rank_logging
from ddp.metrics import MetricsWriter
from ddp.models import build_model
from ddp.optim import build_optimizer, build_scheduler
from ddp.parallel import unwrap_model, wrap_model
from ddp.process_group import process_group
from ddp.run_dir import RunDir
from ddp.seeding import seed_everything
from ddp.checkpointer import Checkpointer
from ddp.signals import EXIT_PREEMPTED, stop_request
from ddp.trainer import FitResult, Trainer, TrainParts

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict[str, Any]  # the last epoch record
    state_dict: dict[str, torch.Tensor]  # final unwrapped weights, on CPU
    stopped_by: str | None = None  # the preemption signal that stopped the run, if any


@dataclass
class Plan:
    """What ``prepare`` settled: the run can start."""

    backend: str
    device: torch.device
    devices: Devices
    threads: int
    splits: Splits


def run(recipe: Recipe, env: ClusterEnv) -> int:
    """Train with rank-aware logging; return the process exit code (0 on success).

    A refusal found by ``prepare`` (bad backend, missing dataset) prints one line and writes no
    file; a failure during training is logged on the console and in the rank's log file.
    """
    try:
        plan = prepare(recipe, env)
    except DDPError as err:
        print_error(err, env.rank)
        return err.exit_code
    run_dir = RunDir(recipe.run_dir)
    with rank_logging(run_dir.rank_log(env.rank), env.rank, env.world_size, hostname(), recipe.log.level):
        try:
            result = execute(recipe, env, plan)
            return EXIT_PREEMPTED if result.stopped_by else 0
        except DDPError as err:
            log.error("%s", err)
            return err.exit_code
        except Exception as err:  # noqa: BLE001 - reported, then the process exits non-zero
            log.error("training failed: %s: %s (traceback in %s)", type(err).__name__, err,
                      run_dir.rank_log(env.rank), exc_info=True)
            return 1


def prepare(recipe: Recipe, env: ClusterEnv, devices: Devices | None = None) -> Plan:
    """Every check that can refuse the run, before any file is written or process group formed."""
    devices = devices or probe_devices()
    check_parallel(recipe.dist.parallel, env)
    backend = choose_backend(recipe.dist.backend, env, devices)
    device = choose_device(backend, recipe.dist.parallel, env, devices)
    splits = build_datasets(recipe.data)
    return Plan(backend, device, devices, _set_threads(recipe, env), splits)


def execute(recipe: Recipe, env: ClusterEnv, plan: Plan | None = None) -> RunResult:
    """All ranks must call. Trains (resuming per ``train.resume``) and returns the outcome."""
    plan = plan or prepare(recipe, env)
    log.info("%s | backend %s, device %s, %d CPU threads per rank | torch %s, python %s",
             env.describe(), plan.backend, plan.device, plan.threads, torch.__version__,
             platform.python_version())
    run_dir = RunDir(recipe.run_dir)
    recipe_yaml = to_yaml(recipe)
    with process_group(env, plan.backend, plan.device, recipe.dist.timeout_s, recipe_yaml):
        parts = build_parts(recipe, plan)
        checkpointer = Checkpointer(recipe.checkpoint, run_dir.checkpoints, recipe_yaml)
        state = checkpointer.resume(recipe.train.resume, parts.model, parts.optimizer, parts.scheduler,
                                    plan.device)
        if env.rank == 0:  # after the resume check: a refused checkpoint leaves the run dir as it was
            run_dir.write_recipe(recipe_yaml)
        tensorboard = run_dir.tensorboard if recipe.log.tensorboard else None
        resumed_step = state.global_step if state else None
        with MetricsWriter(run_dir.metrics, tensorboard, comm.is_main(), resumed_step) as metrics, \
                stop_request(recipe.dist.timeout_s, recipe.checkpoint.signal_poll_s) as stop:
            trainer = Trainer(recipe, parts, metrics, checkpointer, stop, state)
            outcome = trainer.fit()
        weights = {k: v.detach().cpu().clone() for k, v in unwrap_model(parts.model).state_dict().items()}
        step = trainer.state.global_step
        del trainer, parts  # free DDP (and its reducer) before the process group is destroyed
    _log_outcome(outcome, step, run_dir)
    return RunResult(metrics=outcome.last_record, state_dict=weights, stopped_by=outcome.stopped_by)


def _log_outcome(outcome: FitResult, step: int, run_dir: RunDir) -> None:
    if outcome.stopped_by:
        log.warning("stopped by %s at step %d; checkpoint saved. Exit code %d: run the same command to resume",
                    outcome.stopped_by, step, EXIT_PREEMPTED)
    else:
        log.info("done: test accuracy %.4f after %d steps; run dir %s",
                 outcome.last_record.get("test_acc", float("nan")), step, run_dir.root)


def build_parts(recipe: Recipe, plan: Plan) -> TrainParts:
    """All ranks must call (wrapping in DDP broadcasts rank 0's weights)."""
    splits, device = plan.splits, plan.device
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    model = wrap_model(build_model(recipe.model.name, splits.shape, splits.classes),
                       recipe.dist.parallel, device, plan.devices)
    train, test, how = _loaders(recipe, plan)
    steps_per_epoch = len(train)
    total = steps_per_epoch * recipe.train.epochs
    if recipe.train.max_steps >= 0:
        total = min(total, recipe.train.max_steps)
    optimizer = build_optimizer(unwrap_model(model), recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, steps_per_epoch, max(total, 1))
    log.info("%d train / %d test samples, %d steps per epoch at %d per rank × %d ranks, %s",
             len(splits.train), len(splits.test), steps_per_epoch, recipe.data.batch_size, comm.world_size(), how)
    return TrainParts(model, optimizer, scheduler, train, test, device)


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
    return train, test, f"DataLoader with {workers} workers"


def _set_threads(recipe: Recipe, env: ClusterEnv) -> int:
    """Give each rank its share of the cores (torchrun's default is 1 thread per rank)."""
    threads = recipe.dist.threads_per_rank or max(1, available_cpus() // env.local_world_size)
    if torch.get_num_threads() != threads:
        log.debug("CPU threads per rank: %d → %d", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads

