"""Checkpoint policy for a distributed run: who writes, what goes in, which file to resume from.

A checkpoint is one file or one sharded directory (``checkpoint.format``; auto = sharded under
FSDP). A file is written by rank 0 alone: the other ranks' RNG states and partial epoch sums are
gathered to it, and under FSDP the shards of the model and optimizer state too
(``ddp.checkpoint.full_state``), so it holds the whole state as one process would have it. A
sharded checkpoint (``ddp.checkpoint.sharded``) is written by every rank, each its own shards,
and rank 0 publishes it once every rank's files are durable. Every
save ends with rank 0's outcome sent to every rank, which doubles as the barrier: no rank races
ahead of a save, and a failed save stops every rank with the same error. The others wait for it
through the rendezvous store, outside the collective timeout (``comm.patient_broadcast``), so a
save longer than ``dist.timeout_s`` never times out a healthy job. Which checkpoint to resume is
decided beforehand (``ddp.lifecycle.decision``); every rank loads it into host memory with
``weights_only=True`` and copies it into its model and optimizer on its own device. The recipe's
hyperparameters win over the checkpoint's, and the LR schedule
is rebuilt from the recipe (``ddp.model.optim.build_scheduler(start_step=...)``), not loaded.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ddp
from ddp.checkpoint import files, full_state, sharded, storage
from ddp.cluster import comm, progress
from ddp.checkpoint.atomic import atomic_open, write_text_atomic
from ddp.checkpoint.background import BackgroundSaves, Outcome, snapshot
from ddp.checkpoint.background import host_stager as background_host_stager
from ddp.checkpoint.compatibility import FORMAT, check_compatible, shapes, strip_prefixes
from ddp.checkpoint.files import CheckpointError
from ddp.checkpoint.ranking import better
from ddp.errors import StorageError
from ddp.config import BestMode, CheckpointConfig, CheckpointFormat, Parallel, Recipe, to_yaml
from ddp.model.parallel import unwrap_model
from ddp.engine.rng import capture_rng, restore_rng
from ddp.reporting.text import count

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed (the epoch in progress has this index)
    global_step: int = 0  # optimizer steps taken
    sample_index: int = 0  # samples of the current epoch consumed by all ranks together
    partial_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this rank: loss·n, correct, n
    last_record: dict[str, Any] = field(default_factory=dict)  # the newest epoch record


class Checkpointer:
    """All ranks must call ``save`` and ``resume`` together."""

    def __init__(self, cfg: CheckpointConfig, directory: Path, recipe: Recipe) -> None:
        self.cfg, self.directory, self.recipe = cfg, directory, recipe
        self.recipe_yaml = to_yaml(recipe)  # what every checkpoint and manifest records, serialised once
        self._saves = BackgroundSaves(recipe.dist.timeout_s)  # its Gloo group also carries DCP's collectives
        self.background = self._saves if cfg.async_save else None
        self._stager: Any = None  # background saves: host buffers reused save after save
        self._sizes: tuple[tuple[int, int, int], int] | None = None  # (model, optimizer, states) → sharded bytes

    # --- saving ---------------------------------------------------------------------------

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, state: TrainState,
             metric: float | None = None, scaler: Any = None, mode: BestMode | None = None,
             metric_name: str | None = None) -> None:
        """All ranks must call. Every rank returns once the checkpoint is durable, or with
        ``checkpoint.async_save`` once its state is copied to host memory (``finish`` waits for
        the rest). ``metric`` ranks the checkpoint (``best``), higher or lower is better by ``mode``
        (default ``checkpoint.best_mode``)."""
        self.finish()  # at most one save in flight
        per_rank = comm.all_gather_object({"rng": capture_rng(), "sums": list(state.partial_sums)})
        job = _Save(model, optimizer, scheduler, copy.deepcopy(state), per_rank, scaler, metric, mode or self.cfg.best_mode,
                    metric_name, time.perf_counter(), self._sharded_bytes(model, optimizer) if self.sharded else None)
        with progress.phase(progress.SAVING):  # however long it takes, not a stall
            if self.background is not None:
                self._start_in_background(job)
                return
            outcome = self._save_sharded(job) if self.sharded else self._save_file(job)
            _raise(comm.patient_broadcast(outcome, f"the checkpoint of step {state.global_step}"))

    def _sharded_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """``sharded.bytes_of``, counted again only when the model, the optimizer or the number of
        parameters with optimizer state changed (an unfreeze): shapes stay the same in between, and
        counting costs the training thread 2-3 ms a save."""
        key = (id(model), id(optimizer), len(optimizer.state) if optimizer is not None else -1)
        if self._sizes is None or self._sizes[0] != key:
            self._sizes = key, sharded.bytes_of(model, optimizer)
        return self._sizes[1]

    def finish(self) -> None:
        """All ranks must call. Waits for the save in flight (``checkpoint.async_save``) and raises
        its failure on every rank; nothing to do without one."""
        if self.background is not None and self.background.in_flight:
            with progress.phase(progress.SAVING):
                _raise(self.background.wait())

    def failed(self) -> bool:
        """This rank's background save ended in a failure (``ddp.engine.stop`` has the ranks agree)."""
        return self.background is not None and self.background.failed()

    @property
    def sharded(self) -> bool:
        """Does this run write sharded checkpoints (``checkpoint.format``)?"""
        fmt = self.cfg.format
        return fmt == CheckpointFormat.sharded or (fmt == CheckpointFormat.auto and
                                                   self.recipe.dist.parallel == Parallel.fsdp)

    def _save_file(self, job: _Save) -> Outcome:
        """All ranks must call (under FSDP they gather); rank 0 writes. Rank 0's outcome."""
        weights, optimizer_state = full_state.gather(job.model, job.optimizer)  # under FSDP: every rank gathers
        if not comm.is_main():
            return None
        return self._write_file(job, self._payload(weights, optimizer_state, job))

    def _write_file(self, job: _Save, payload: dict[str, Any]) -> Outcome:
        """Rank 0: write the file, its manifest and ``latest``; None or the failure."""
        try:
            manifest = files.save(self.directory, payload, job.state.global_step, job.state.epoch, job.metric,
                                  self.recipe_yaml, job.metric_name)
            self._after_save(manifest, job.mode)
        except Exception as err:  # noqa: BLE001 - every rank must hear about it
            return self._failure(err, job.state.global_step, payload)
        return None

    def _save_sharded(self, job: _Save) -> Outcome:
        """All ranks must call: each writes its shards into a hidden directory; rank 0 adds the train
        state and, once every rank reported its files durable, publishes it. Rank 0's outcome."""
        final, partial = self._partial_dir(job)
        payload = self._payload(None, None, job) if comm.is_main() else None
        group = self._saves.group()  # DCP's collectives wait as long as a slow rank writes
        try:
            sharded.write_shards(partial, job.model, job.optimizer, group, _distributed())
            report = self._shards_written(partial, payload)
        except sharded.save_errors() as err:  # rank 0 says it for every rank
            report = (None, sharded.describe_error(err, comm.rank()))
        reports = comm.all_gather_object(report)
        return self._publish_shards(job, final, partial, reports) if comm.is_main() else None

    def _partial_dir(self, job: _Save) -> tuple[Path, Path]:
        """All ranks must call. (final, partial) directories of this save, the partial one made empty."""
        final = self.directory / files.checkpoint_name(job.state.global_step, sharded=True)
        partial = sharded.partial_dir(final)
        with comm.all_or_none(f"preparing {final.name}"):  # also the barrier: every rank writes into it next
            if comm.is_main():
                try:
                    files.remove(partial)  # a save of this step killed before
                    partial.mkdir(parents=True)
                except OSError as err:
                    raise self._refusal(err, job) from None
        return final, partial

    def _refusal(self, err: OSError, job: _Save) -> Exception:
        problem, hint, code = self._failure(err, job.state.global_step, None, needed=job.needed)
        return (StorageError if code == StorageError.exit_code else CheckpointError)(problem, hint)

    @staticmethod
    def _shards_written(partial: Path, payload: dict[str, Any] | None) -> tuple[dict[str, list[int]], None]:
        """After this rank's shards are durable: rank 0 adds the train state; this rank's files."""
        if payload is not None:
            with atomic_open(partial / sharded.STATE_FILE, sync_dir=True) as handle:
                files.torch_save(payload, handle)
        return sharded.own_files(partial, comm.rank()), None

    def _publish_shards(self, job: _Save, final: Path, partial: Path, reports: list[Any]) -> Outcome:
        """Rank 0, once every rank reported: move the directory into place, manifest, ``latest``."""
        failed = [error for _, error in reports if error is not None]
        if failed:
            files.remove(partial)
            rank, code, text = failed[0]
            if code is None:
                return (f"saving a checkpoint in {self.directory} failed on rank {rank}: {text}",
                        "check free disk space and permissions of the run dir", CheckpointError.exit_code)
            return self._failure(OSError(code, text), job.state.global_step, None, rank=rank, needed=job.needed)
        listed = {name: entry for mine, _ in reports for name, entry in (mine or {}).items()}
        state = job.state
        manifest = files.Manifest(final.name, sum(size for size, _ in listed.values()), 0, state.global_step,
                                  state.epoch, job.metric, self.recipe_yaml, round(time.perf_counter() - job.began, 3),
                                  job.metric_name, files=listed)
        try:
            sharded.move_into_place(partial, final)
            files.publish(self.directory, manifest)
            self._after_save(manifest, job.mode)
        except Exception as err:  # noqa: BLE001 - every rank must hear about it
            files.remove(partial)
            return self._failure(err, state.global_step, None)
        return None

    def _start_in_background(self, job: _Save) -> None:
        """All ranks must call. Copies what the save needs to host memory and hands the rest to the
        background thread (``ddp.checkpoint.background``)."""
        background = self.background
        assert background is not None
        group = background.group()
        if self.sharded:
            final, partial = self._partial_dir(job)
            payload = snapshot(self._payload(None, None, job)) if comm.is_main() else None
            written = sharded.start_shards(partial, job.model, job.optimizer, group, _distributed(),
                                           self._host_stager())

            def rest() -> Outcome:  # every rank reaches both collectives, whatever fails before them
                try:
                    written()
                    report = self._shards_written(partial, payload)
                except sharded.save_errors() as err:
                    report = (None, sharded.describe_error(err, comm.rank()))
                reports = background.all_gather(report)
                return background.broadcast(_guarded(lambda: self._publish_shards(job, final, partial, reports))
                                            if comm.is_main() else None)
        else:
            weights, optimizer_state = full_state.gather(job.model, job.optimizer)
            payload = self._background_payload(weights, optimizer_state, job) if comm.is_main() else None

            def rest() -> Outcome:
                return background.broadcast(_guarded(lambda: self._write_file(job, payload))
                                            if payload is not None else None)
        background.start(rest)

    def _background_payload(self, weights: dict[str, Any] | None, optimizer_state: dict[str, Any] | None,
                            job: _Save) -> dict[str, Any]:
        """Rank 0's payload, safe from training: host copies of its tensors. Under FSDP the gathered
        model and optimizer state are such copies already (no second one)."""
        payload = snapshot(self._payload(None, None, job))
        if not full_state.is_live(job.model):
            return {**payload, "model": weights, "optimizer": optimizer_state}
        stager = self._host_stager()
        state = {"model": weights, "optimizer": optimizer_state}
        return {**payload, **(stager.stage(state) if stager is not None else snapshot(state))}

    def _host_stager(self) -> Any:
        if self._stager is None:
            self._stager = background_host_stager()
        return self._stager

    def _failure(self, err: BaseException, step: int, payload: dict[str, Any] | None, rank: int = 0,
                 needed: int | None = None) -> tuple[str, str, int]:
        """(problem, hint, exit code) of a failed save, for every rank: a disk that refused it
        (full, over quota, I/O error) is a ``StorageError`` naming the size needed and the room left."""
        if needed is None and payload is not None:
            needed = storage.payload_bytes(payload)
        refused = storage.save_failed(err, self.directory, files.checkpoint_name(step, self.sharded), needed)
        if refused is not None:
            return refused.problem, refused.hint, refused.exit_code
        return (f"saving a checkpoint in {self.directory} failed on rank {rank}: {type(err).__name__}: {err}",
                "check free disk space and permissions of the run dir", CheckpointError.exit_code)

    def _payload(self, weights: dict[str, Any] | None, optimizer_state: dict[str, Any] | None,
                 job: _Save) -> dict[str, Any]:
        state, scheduler, scaler, per_rank = job.state, job.scheduler, job.scaler, job.per_rank
        saved_state = asdict(state)
        saved_state.pop("partial_sums")
        return {
            "format": FORMAT,
            "model": weights,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": saved_state,
            "ranks": per_rank,  # index r: rank r's RNG states and partial epoch sums
            "world_size": comm.world_size(),
            "recipe": self.recipe_yaml,
            "versions": {"ddp": ddp.__version__, "torch": str(torch.__version__), "python": platform.python_version()},
        }

    def _after_save(self, manifest: files.Manifest, mode: BestMode | None = None) -> None:
        mode = mode or self.cfg.best_mode
        best = self._best_manifest()
        if manifest.metric is not None and (best is None or better(manifest.metric, best.metric, mode)):
            write_text_atomic(self.directory / "best", manifest.file + "\n")
            best = manifest
        removed = files.prune(self.directory, self.cfg.keep, protect={best.file} if best else set())
        log.info("checkpoint %s saved (step %d)%s", self.directory / manifest.file, manifest.step,
                 f", removed {', '.join(removed)}" if removed else "")

    def _best_manifest(self) -> files.Manifest | None:
        name = files.read_pointer(self.directory, "best")
        if name is None:
            return None
        try:
            return files.read_manifest(self.directory / name)
        except CheckpointError:
            return None


    # --- resuming -------------------------------------------------------------------------

    def resume(self, path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               scaler: Any = None, scheduler: Any = None) -> TrainState | None:
        """All ranks must call, with the same ``path`` (None: nothing to resume). Loads weights,
        optimizer state and this rank's RNG and epoch sums; the optimizer keeps the recipe's
        hyperparameters (lr, momentum, weight decay...), only its state comes from the file.
        ``scheduler``: a schedule of the user's own loop, loaded from the file (our trainer
        rebuilds its schedule from the recipe instead)."""
        if path is None:
            return None
        if files.is_sharded(path):
            payload = sharded.read_train_state(path)
            check_compatible(payload, sharded.model_shapes(path), self.recipe, unwrap_model(model), path)
            with _recipe_hyperparameters(optimizer):
                sharded.load(path, model, optimizer, self._saves.group(), _distributed())  # each rank: its pieces
        else:
            payload = files.load(path)  # onto the CPU; load_state_dict moves each tensor to its parameter
            weights = strip_prefixes(payload["model"])
            check_compatible(payload, shapes(weights), self.recipe, unwrap_model(model), path)
            with _recipe_hyperparameters(optimizer if payload.get("optimizer") else None):
                full_state.load(model, optimizer, weights, payload.get("optimizer") or None)
        if scheduler is not None and payload.get("scheduler"):
            scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        state = self._restore_rank_state(payload)
        log.info("resumed from %s: epoch %d, step %d, sample %d of the epoch (saved by %s, now %d)",
                 path, state.epoch, state.global_step, state.sample_index, count(payload["world_size"], "rank"),
                 comm.world_size())
        return state

    def _restore_rank_state(self, payload: dict[str, Any]) -> TrainState:
        saved_world, ranks = payload["world_size"], payload["ranks"]
        rank, world = comm.rank(), comm.world_size()
        restore_rng(ranks[rank % saved_world]["rng"])
        if world == saved_world:
            sums = list(ranks[rank]["sums"])
        else:  # the epoch's running sums are totals: give them all to rank 0
            sums = [sum(r["sums"][i] for r in ranks) for i in range(3)] if rank == 0 else [0.0, 0.0, 0.0]
        return TrainState(**payload["state"], partial_sums=sums)


@dataclass
class _Save:
    """One save: what it writes and how its checkpoint ranks."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    state: TrainState
    per_rank: list[dict[str, Any]]  # index r: rank r's RNG states and partial epoch sums
    scaler: Any
    metric: float | None
    mode: BestMode
    metric_name: str | None
    began: float  # perf_counter at the start
    needed: int | None = None  # about how many bytes a sharded save writes (for a disk's refusal), from the training thread


def _distributed() -> bool:
    """Does DCP coordinate ranks (a process group of 2+), or save and load in this one process?"""
    return comm.is_initialized() and comm.world_size() > 1


def _guarded(work: Any) -> Outcome:
    """Rank 0's part of a background save, whose outcome must reach the broadcast whatever it raises."""
    try:
        return work()
    except BaseException as err:  # noqa: BLE001 - the other ranks wait in the broadcast for it
        return (f"a background checkpoint save failed on rank 0: {type(err).__name__}: {err}",
                "check free disk space and permissions of the run dir", CheckpointError.exit_code)


def _raise(outcome: Outcome) -> None:
    """Raise a failed save's outcome (the same on every rank)."""
    if outcome is not None:
        problem, hint, exit_code = outcome
        raise (StorageError if exit_code == StorageError.exit_code else CheckpointError)(problem, hint)


@contextmanager
def _recipe_hyperparameters(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Around loading a checkpoint: momentum buffers and moments come from it, hyperparameters
    stay the recipe's (loading the optimizer's state dict alone would bring back the old lr,
    weight decay and betas)."""
    if optimizer is None:
        yield
        return
    recipe_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, values in zip(optimizer.param_groups, recipe_groups):  # loading may have replaced the groups
        group.update(values)
