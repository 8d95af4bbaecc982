"""Rank 0's decision, before anything is written: which version directory this run uses and which
checkpoint, if any, it resumes from.

``train.resume``:
  auto    resume the newest version when it has a valid checkpoint and is not finished under this
          recipe (a killed rank, a preemption, a requeue, a raised ``train.epochs``); otherwise
          start the next version, saying why (a finished run is never reopened silently);
  never   start the next version; the existing versions are never touched;
  <path>  a checkpoint file, a version directory or a run group: continue its version when it is
          the version's newest checkpoint, else start a new version from it.
Resuming compares the checkpoint's recipe with this one (``changes``): refused changes stop the run
with the key named; a run already finished under this recipe trains nothing and says so.

A restarted or requeued job (``Attempt.restarted``: torchrun's restart count, Slurm's requeue
count) never starts over, whatever ``train.resume`` says: it continues the version its job trains in
(``version_N/job.json``), never a newer one someone else made; finished, it trains nothing and says
so; without a checkpoint yet, it trains that version again from where its first start began. Only
a job that never got as far as choosing a version follows the rules above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from ddp.checkpoint import files
from ddp.checkpoint.files import CheckpointError, Manifest
from ddp.checkpoint.storage import unwritable
from ddp.cluster.environment import Attempt
from ddp.config import Recipe
from ddp.lifecycle import lock
from ddp.lifecycle.changes import Change, check_resumable, recipe_changes
from ddp.lifecycle.versions import (JOB_FILE, claim_next, job_version, list_versions, owning_version,
                                    record_job, remove_created)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    run_dir: Path  # the version directory this run writes
    checkpoint: Path | None = None  # resume from this file; None: fresh weights
    created: tuple[Path, ...] = ()  # directories the decision created (removed again if the run is refused)
    notice: str = ""  # why this version, logged when the run starts
    changes: tuple[Change, ...] = field(default=())  # honoured changes against the checkpoint's recipe
    done: str = ""  # nothing to train: this line is said and the run ends (exit 0), writing nothing

    def abandon(self) -> None:
        """Rank 0, when the run is refused after deciding: unlock, remove the directories it made."""
        lock.release(self.run_dir)
        if self.run_dir in self.created:
            (self.run_dir / ".lock").unlink(missing_ok=True)
            (self.run_dir / JOB_FILE).unlink(missing_ok=True)
        remove_created(list(self.created))


def decide(recipe: Recipe, attempt: Attempt = Attempt()) -> Decision:
    """Rank 0 only. Raises CheckpointError (nothing written) when the run cannot start, and
    StorageError when its directory cannot be written (read-only, not this user's, full). A run
    that will train holds its version's lock (``ddp.lifecycle.lock``) until ``lock.release``, and
    its version names ``attempt``'s job, for the job's restarts."""
    try:
        decision = _restarted(recipe, attempt) or _decide(recipe)
        if attempt.job and not decision.done:
            _record_job(decision, attempt.job)
        return decision
    except OSError as err:
        refused = unwritable(recipe.run_dir, err)
        if refused is None:
            raise
        raise refused from None


def _decide(recipe: Recipe) -> Decision:
    spec, group = recipe.train.resume, recipe.run_dir
    if spec == "never":
        existing = list_versions(group)
        return _fresh(group, f"train.resume=never: starting {{new}} ({existing[-1].parent}/version_* are left "
                             f"as they are)" if existing else "")
    if spec == "auto":
        return _auto(group, recipe)
    return _explicit(Path(spec), group, recipe)


def _record_job(decision: Decision, job: str) -> None:
    try:
        record_job(decision.run_dir, job)
    except OSError:
        decision.abandon()
        raise


def _restarted(recipe: Recipe, attempt: Attempt) -> Decision | None:
    """A restart or requeue continues its own version (finished: nothing to train); None when the
    job is not restarted or chose no version before."""
    own = job_version(recipe.run_dir, attempt.job) if attempt.restarted else None
    if own is None:
        return None
    again = attempt.describe()
    checkpoint = newest_valid(own / "checkpoints")
    if checkpoint is not None:
        decision = _continue(own, checkpoint, files.read_manifest(checkpoint), recipe)
        if decision.done:
            return replace(decision, done=f"{again}: {decision.done}")
        return replace(decision, notice=f"{again}: continuing {own}")
    start = _first_start(recipe)
    lock.acquire(own)
    origin = f"from {start[0]}" if start else "from step 0"
    return Decision(own, start[0] if start else None, changes=start[1] if start else (),
                    notice=f"{again}: {own} has no checkpoint yet; training it again {origin}")


def _first_start(recipe: Recipe) -> tuple[Path, tuple[Change, ...]] | None:
    """The checkpoint a job's first start began its new version from (``train.resume=<path>``)."""
    if recipe.train.resume in ("auto", "never"):
        return None
    checkpoint = _resolve_path(Path(recipe.train.resume), recipe.train.resume)
    files.verify(checkpoint)
    return checkpoint, tuple(_check_changes(checkpoint, recipe))


def _fresh(group: Path, why: str, checkpoint: Path | None = None) -> Decision:
    path, created = claim_next(group)
    lock.acquire(path)
    notice = why.replace("{new}", str(path))  # not str.format: paths may hold braces
    return Decision(path, checkpoint, tuple(created), notice)


def _auto(group: Path, recipe: Recipe) -> Decision:
    versions = list_versions(group)
    if not versions:
        return _fresh(group, "")
    latest = versions[-1]
    checkpoint = newest_valid(latest / "checkpoints")
    if checkpoint is None:
        return _fresh(group, f"{latest} has no checkpoint to resume from; starting {{new}}")
    manifest = files.read_manifest(checkpoint)
    if finished(manifest, recipe):
        return _fresh(group, f"{latest} finished at {_where(manifest, recipe)}; starting {{new}}. "
                             f"To train {latest.name} further instead: train.resume={latest} "
                             f"train.epochs=<more than {manifest.epoch}>")
    return _continue(latest, checkpoint, manifest, recipe)


def _explicit(path: Path, group: Path, recipe: Recipe) -> Decision:
    checkpoint = _resolve_path(path, recipe.train.resume)
    manifest = files.verify(checkpoint)
    owner = owning_version(checkpoint)
    if owner is not None and _is_newest(checkpoint):
        return _continue(owner, checkpoint, manifest, recipe)
    changes = _check_changes(checkpoint, recipe)
    if finished(manifest, recipe):
        return Decision(checkpoint.parent, done=_done_line(checkpoint, manifest, recipe))
    kept = f" ({owner} is left as it is: that is not its newest checkpoint)" if owner is not None else ""
    return replace(_fresh(group, f"starting {{new}} from {checkpoint}{kept}", checkpoint), changes=tuple(changes))


def _continue(version: Path, checkpoint: Path, manifest: Manifest, recipe: Recipe) -> Decision:
    changes = _check_changes(checkpoint, recipe)
    if finished(manifest, recipe):
        return Decision(version, done=_done_line(version, manifest, recipe))
    lock.acquire(version)
    return Decision(version, checkpoint, changes=tuple(changes))


def _check_changes(checkpoint: Path, recipe: Recipe) -> list[Change]:
    changes = recipe_changes(files.saved_recipe(checkpoint), recipe)
    check_resumable(changes, str(checkpoint))
    return changes


def finished(manifest: Manifest, recipe: Recipe) -> bool:
    """True when the checkpoint already reached this recipe's ``train.epochs`` or ``train.max_steps``."""
    return reached_end(manifest.epoch, manifest.step, recipe.train.epochs, recipe.train.max_steps)


def reached_end(epoch: int, step: int, epochs: float, max_steps: int) -> bool:
    """A run at ``epoch`` (epochs completed) and ``step`` is done under ``train.epochs=epochs`` and
    ``train.max_steps=max_steps`` (-1: no step limit)."""
    return epoch >= epochs or 0 <= max_steps <= step


def _where(manifest: Manifest, recipe: Recipe) -> str:
    name = manifest.metric_name or recipe.checkpoint.best_metric
    metric = f", {name} {manifest.metric:.4f}" if manifest.metric is not None else ""
    return f"epoch {manifest.epoch}, step {manifest.step}{metric}"


def _done_line(what: Path, manifest: Manifest, recipe: Recipe) -> str:
    cap = f", train.max_steps={recipe.train.max_steps}" if recipe.train.max_steps >= 0 else ""
    return (f"{what} already finished at {_where(manifest, recipe)}: nothing to train "
            f"(train.epochs={recipe.train.epochs}{cap}). To train more: raise train.epochs; "
            f"to start over: train.resume=never")


def _resolve_path(path: Path, spec: str) -> Path:
    """A checkpoint file, or the newest valid checkpoint under a version, group or checkpoints dir."""
    if not path.is_dir() or files.is_sharded(path):
        return path  # one checkpoint; files.verify says so when it does not exist
    versions = list_versions(path)
    directory = versions[-1] if versions else path
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    found = newest_valid(directory)
    if found is None:
        raise CheckpointError(f"train.resume={spec}: no valid checkpoint in that directory.",
                              "point train.resume at a step-*.pt file or step-*.dcp directory, or use auto/never")
    return found


def _is_newest(checkpoint: Path) -> bool:
    """True when no valid checkpoint of its directory is newer (``checkpoint`` itself is verified)."""
    for path in files.candidates(checkpoint.parent):
        if path == checkpoint:
            return True
        try:
            files.verify(path)
            return False
        except CheckpointError:
            continue
    return False


def newest_valid(directory: Path) -> Path | None:
    """The newest checkpoint in ``directory`` whose size and CRC match its manifest; broken ones
    are skipped with a warning naming them."""
    for path in files.candidates(directory):
        try:
            files.verify(path)
            return path
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err.problem)
    return None
