"""``data.batch_size: auto`` → one integer every rank agrees on, before any loader is built.

In order: a resumed run keeps the sizes its checkpoint was trained with; else a cache entry for
the same device, model, input, dtype, optimizer, world size and data on the device is reused when
it still fits; else each rank probes its own device (``probe_recipe``) on a copy of the very model
the run will train. The budget holds the model's state and activations and the data the in-memory
loader (``data.loader``) will keep on the device, which each rank holds a copy of. Then one
collective settles the sizes (``agree``), rank 0 logs the table, writes ``memory_probe.json`` in the
run dir and updates the cache (a failure there is raised on every rank). The returned recipe holds
integers, so recipe.yaml and every checkpoint record them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from ddp.checkpoint import files
from ddp.cluster import comm
from ddp.checkpoint.atomic import write_text_atomic
from ddp.config import Parallel, Recipe, is_auto
from ddp.data.datasets import Splits
from ddp.errors import ConfigError, DDPError, MemoryBudgetError
from ddp.memory import cache
from ddp.memory.agree import agree
from ddp.memory.policy import sound_batch
from ddp.memory.estimate import MB, Estimate, estimate_state
from ddp.memory.trials import ProbeResult, budget_error, probe_model
from ddp.memory.readers import MemoryReader, reader_for
from ddp.data.device_data import data_on_device
from ddp.model.registry import build_model as build_recipe_model
from ddp.model.optim import build_optimizer
from ddp.engine.rng import capture_rng, restore_rng

if TYPE_CHECKING:  # the runner imports this module: its Plan is a type here only
    from ddp.cluster.environment import ClusterEnv
    from ddp.lifecycle.run_dir import RunDir
    from ddp.runner import Plan

log = logging.getLogger(__name__)
KEYS = {"train": "batch_size", "eval": "eval_batch_size"}
PROBE_FILE = "memory_probe.json"


@dataclass
class RecipeProbe:
    """One rank's probe of a recipe: the estimate, the budget and a result per kind."""

    estimate: Estimate
    budget: float
    device: str
    usage: str
    results: dict[str, ProbeResult]

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "usage": self.usage, "budget_mb": round(self.budget / MB, 2),
                "shards": self.estimate.shards,
                "estimate_mb": {k: None if v is None else round(v / MB, 4) for k, v in self.estimate.to_json().items()
                                if k != "shards"},
                "probes": {kind: r.to_json() for kind, r in self.results.items()}}


def auto_kinds(recipe: Recipe) -> list[str]:
    return [kind for kind, key in KEYS.items() if is_auto(getattr(recipe.data, key))]




def resolve_batch_sizes(recipe: Recipe, env: ClusterEnv, plan: Plan, run_dir: RunDir, checkpoint: Path | None) -> Recipe:
    """All ranks must call (two collectives when a batch size is ``auto``, none otherwise): the
    agreement, then rank 0's outcome of writing the results (a failure there is raised on every rank).

    ``checkpoint``: the file this run resumes from, as ``ddp.lifecycle`` decided (None: a fresh start).

    ``env``: the ClusterEnv; ``plan``: the session's Plan (splits, device, and the model ``prepare``
    built: the probe sizes a copy of exactly that model); ``run_dir``: the RunDir (files go under
    its ``root``)."""
    kinds = auto_kinds(recipe)
    if not kinds:
        return recipe
    world = comm.world_size()
    sizes, error, report, source = None, None, {}, "probe"
    try:
        sizes = _from_checkpoint(kinds, checkpoint)
        source = "checkpoint"
        if sizes is None:
            sizes, report, source = _probe_or_cache(recipe, plan.splits, plan.device, world, kinds,
                                                    env.local_world_size, plan.model)
    except Exception as err:  # noqa: BLE001 - every rank must hear about it (see agree)
        error = err
    agreed, reports = agree(sizes, error, {"source": source, **report})
    chosen = dict(agreed)
    if "train" in chosen and source != "checkpoint":  # a checkpoint's batch was chosen when it was written
        chosen["train"] = _capped(recipe, plan.splits, chosen["train"], world)
    _publish_from_rank_0(recipe, run_dir, agreed, reports, source, world, chosen)
    data = dataclasses.replace(recipe.data, **{KEYS[kind]: chosen[kind] for kind in kinds})
    return dataclasses.replace(recipe, data=data)


def check_budget(recipe: Recipe, env: ClusterEnv, splits: Splits, device: torch.device,
                 model: torch.nn.Module | None = None) -> None:
    """Not collective. Refuse an ``auto`` batch size whose budget cannot even hold the parameters,
    gradients, optimizer state and the data the in-memory loader keeps on the device
    (``MemoryBudgetError``), before any process group or file.

    ``model``: the model ``prepare`` built (exactly what will train). Without it the recipe's model
    is rebuilt; where the recipe cannot rebuild it (a model given to ``ddp.fit`` as an instance
    whose class needs arguments) the check is left to the probe, which makes it on a copy of the
    exact model before any trial step."""
    if not auto_kinds(recipe):
        return
    if model is None:
        try:
            model = _rebuilt(recipe, splits)
        except ConfigError as err:
            log.debug("data.batch_size=auto: no budget check before the group (%s); the probe checks", err)
            return
    data = _data_on_device(recipe, splits, device)
    estimate = _estimate(recipe, model, env.world_size, data)
    budget = _budget(recipe, reader_for(device, env.local_world_size), estimate, splits, _whole_held(model, device))
    if estimate.state > budget:
        raise budget_error(estimate, budget, None, fsdp=_fsdp_alternative(recipe, model, env.world_size, data))


def probe_recipe(recipe: Recipe, splits: Splits, device: torch.device, world: int, kinds: list[str],
                 reader: MemoryReader | None = None, ranks_on_host: int = 1,
                 model: torch.nn.Module | None = None) -> RecipeProbe:
    """Probe ``kinds`` for this recipe on this rank, on a throwaway copy of ``model`` (the model the
    run will train; None: a fresh build of the recipe's model) and a throwaway optimizer, so the
    training model is never touched. Not collective. Raises ``MemoryBudgetError``."""
    reader = reader or reader_for(device, ranks_on_host)
    data = _data_on_device(recipe, splits, device)  # asked before the copy takes device memory
    rng = capture_rng()
    try:
        model = _throwaway_model(recipe, splits, model)
        estimate = _estimate(recipe, model, world, data)  # sizes only: the same wherever the copy is
        if estimate.shards > 1:  # before the whole copy goes to the device
            _check_whole_copy(recipe, model, estimate, _budget(recipe, reader, estimate, splits,
                                                               _whole_held(model, device)), kinds)
        model = model.to(device)
        optimizer = build_optimizer(model, recipe.optim)
        budget = _budget(recipe, reader, estimate, splits, _whole_held(model, device))
        limits = {"train": _shard(len(splits.train), world), "eval": _shard(len(splits.test), world)}
        results = probe_model(model, optimizer, splits.shape, splits.classes, reader, budget,
                              {kind: limits[kind] for kind in kinds}, estimate,
                              _fsdp_alternative(recipe, model, world, data), recipe.memory.fraction)
        return RecipeProbe(estimate, budget, reader.describe(), _usage(reader), results)
    finally:
        model = optimizer = None  # noqa: F841 - the throwaway copy goes before the training model comes
        reader.recover()
        restore_rng(rng)


def _throwaway_model(recipe: Recipe, splits: Splits, model: torch.nn.Module | None) -> torch.nn.Module:
    """What the probe sizes: a deep copy of ``model``, so exactly the model this run trains (one
    given to ``ddp.fit`` as an instance is never rebuilt from its class, which could need arguments
    or build another architecture); without one (``python -m ddp.probe``), the recipe's model."""
    if model is None:
        return _rebuilt(recipe, splits)
    try:
        return copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001 - the user's module decides what copying does
        raise DDPError(f"data.batch_size=auto: the memory probe sizes a copy of the model, and copy.deepcopy of "
                       f"{type(model).__name__} failed: {type(err).__name__}: {err}",
                       "make the model deep-copyable, or give data.batch_size and data.eval_batch_size as numbers"
                       ) from None


def _rebuilt(recipe: Recipe, splits: Splits) -> torch.nn.Module:
    """A fresh build of the recipe's model (built-in or your own, ``ddp.model.registry``); the random
    generators are left as they were."""
    rng = capture_rng()
    try:
        return build_recipe_model(recipe.model, splits)
    finally:
        restore_rng(rng)


def _data_on_device(recipe: Recipe, splits: Splits, device: torch.device) -> int:
    """Bytes of data the loader this recipe gets will keep on ``device`` (0 for the DataLoader);
    each rank holds its own copy (``ddp.data.device_data.data_on_device``)."""
    return data_on_device(recipe.data.loader, splits, device, recipe.data.memory_limit_mb)


def _estimate(recipe: Recipe, model: torch.nn.Module, world: int, data: int,
              parallel: Parallel | None = None) -> Estimate:
    """The analytic table for ``model`` under this recipe (or under ``parallel`` instead of its
    ``dist.parallel``), with ``data`` bytes kept on the device: DDP adds its buckets, FSDP shards
    over the world size."""
    parallel = parallel or recipe.dist.parallel
    ddp_ranks = world if parallel == Parallel.ddp else 1
    shards = world if parallel == Parallel.fsdp else 1
    estimate = estimate_state(model, recipe.optim.name.value, recipe.optim.momentum, torch.float32, ddp_ranks,
                              recipe.dist.gradient_as_bucket_view, shards, tuple(recipe.dist.fsdp_blocks))
    estimate.data_on_device = data
    return estimate


def _fsdp_alternative(recipe: Recipe, model: torch.nn.Module, world: int, data: int) -> Estimate | None:
    """The estimate under dist.parallel=fsdp at this world size, for a DDP run of 2+ ranks whose
    refusal can then say whether sharding would fit (None otherwise)."""
    if recipe.dist.parallel != Parallel.ddp or world < 2:
        return None
    try:
        return _estimate(recipe, model, world, data, Parallel.fsdp)
    except ConfigError:  # dist.fsdp_blocks naming classes this model lacks: no alternative to offer
        return None


def _check_whole_copy(recipe: Recipe, model: torch.nn.Module, estimate: Estimate, budget: float,
                      kinds: list[str]) -> None:
    """Not collective. Under ``dist.parallel=fsdp`` (``estimate`` sharded) the trial steps run on a
    whole, unwrapped copy of the model on each rank (no collective inside a trial: see ``ddp.memory.trials``). Refuse,
    before any trial, when that copy's parameters, gradients and optimizer state alone exceed the
    budget: the trials could not even start, though the shards might fit."""
    whole = _estimate(recipe, model, 1, estimate.data_on_device, Parallel.ddp)
    if whole.state <= budget:
        return
    names = [f"data.{KEYS[kind]}" for kind in kinds]
    keys = "/".join(names)
    raise MemoryBudgetError(
        f"{keys}=auto under dist.parallel=fsdp measures the activations on a whole copy of the model on each "
        f"rank, and that copy needs {whole.state / MB:,.1f} MB before any activation, more than the memory budget "
        f"of {budget / MB:,.1f} MB (sharded over {estimate.shards} ranks, a rank holds {estimate.state / MB:,.1f} MB "
        "before any activation).",
        f"give {' and '.join(f'{name}=N' for name in names)} with dist.parallel=fsdp, leaving "
        f"{max(budget - estimate.state, 0) / MB:,.1f} MB per rank for the activations")


def _whole_held(model: torch.nn.Module, device: torch.device) -> int:
    """Not collective. The bytes of ``model``'s whole parameters that are on ``device``'s kind when
    the budget is read, so already out of its free memory: the probe's copy once it is there, the
    model every rank builds in host memory on the CPU; nothing on a GPU before the model is placed
    (DDP's check before the group, the probe cache's lookup) or sharded (FSDP places blocks one by one)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)


def _budget(recipe: Recipe, reader: MemoryReader, estimate: Estimate, splits: Splits, held_params: int) -> float:
    """memory.budget_mb, or memory.fraction of what this rank may use: its free memory (on the CPU,
    its share of the host's) plus what it holds already: ``held_params``, the parameters on the
    device when this is read (``_whole_held``), and, on the CPU, data that is tensors already (the
    in-memory loader keeps those very tensors, no copy). The data on the device is part of
    ``estimate.state``, so it comes off this."""
    if recipe.memory.budget_mb > 0:
        return float(recipe.memory.budget_mb * MB)
    held = held_params
    if reader.device.type == "cpu" and splits.in_memory:
        held += estimate.data_on_device
    return recipe.memory.fraction * (reader.room() + held)


def _shard(count: int, world: int) -> int:
    """A rank's share of a split: a larger batch than this never occurs."""
    return max(1, math.ceil(count / world))


def _usage(reader: MemoryReader) -> str:
    line = getattr(reader, "usage_line", None)
    return line() if line else ""


def _probe_or_cache(recipe: Recipe, splits: Splits, device: torch.device, world: int, kinds: list[str],
                    ranks_on_host: int, model: torch.nn.Module | None
                    ) -> tuple[dict[str, int], dict[str, Any], str]:
    reader = reader_for(device, ranks_on_host)
    path = Path(recipe.memory.cache) if recipe.memory.cache else None
    architecture = model if model is not None else _rebuilt(recipe, splits)  # for the key, not copied
    estimate = _estimate(recipe, architecture, world, _data_on_device(recipe, splits, device))
    key = _key(recipe, splits, reader, world, str(architecture), estimate.data_on_device)
    budget_mb = _budget(recipe, reader, estimate, splits, _whole_held(architecture, device)) / MB
    del architecture
    cached = cache.lookup(path, key, kinds, budget_mb)
    if cached is not None:
        return cached, {"cache_key": key, "budget_mb": round(budget_mb, 2)}, "cache"
    probe = probe_recipe(recipe, splits, device, world, kinds, reader, model=model)
    return {kind: r.pick for kind, r in probe.results.items()}, {"cache_key": key, **probe.to_json()}, "probe"


def _key(recipe: Recipe, splits: Splits, reader: MemoryReader, world: int, architecture: str, data: int) -> str:
    optimizer = recipe.optim.name.value + ("+momentum" if recipe.optim.name.value == "sgd" and recipe.optim.momentum
                                           else "")
    return cache.cache_key(reader.describe(), recipe.model.name, architecture, tuple(splits.shape), "float32",
                           optimizer, world, data, recipe.dist.parallel.value)


def _capped(recipe: Recipe, splits: Splits, fits: int, world: int) -> int:
    """``policy.sound_batch``, said in one line (rank 0) when it lowers the batch."""
    chosen = sound_batch(fits, len(splits.train), world, recipe.train.accumulate,  # type: ignore[arg-type]
                         recipe.data.auto_min_steps)
    if chosen < fits and comm.is_main():
        steps = -(-len(splits.train) // (chosen * world * recipe.train.accumulate))  # type: ignore[arg-type]
        log.info("data.batch_size=auto: %d per rank fit in memory; using %d so an epoch keeps %d optimizer steps "
                 "(data.auto_min_steps=%d) at optim.lr=%g", fits, chosen, steps, recipe.data.auto_min_steps,
                 recipe.optim.lr)
    return chosen


def _from_checkpoint(kinds: list[str], path: Path | None) -> dict[str, int] | None:
    """The sizes the checkpoint this run will resume from was trained with (None: no checkpoint).
    Read from its manifest (``checkpoint_files.saved_recipe``), not by loading the checkpoint."""
    if path is None:
        return None
    try:
        saved = OmegaConf.create(files.saved_recipe(path))
    except (files.CheckpointError, KeyError, TypeError):
        return None  # not a usable checkpoint: the Checkpointer refuses it, with its own message
    sizes = {kind: OmegaConf.select(saved, f"data.{KEYS[kind]}") for kind in kinds}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values()):
        return None
    log.info("data.%s=auto: keeping %s from checkpoint %s", "/".join(KEYS[k] for k in kinds),
             ", ".join(str(sizes[k]) for k in kinds), path)
    return sizes  # type: ignore[return-value]


def _publish_from_rank_0(recipe: Recipe, run_dir: RunDir, agreed: dict[str, int], reports: list[dict[str, Any]],
                         source: str, world: int, chosen: dict[str, int]) -> None:
    """All ranks must call (one broadcast). Rank 0 publishes; if that fails (an unwritable run dir),
    every rank raises the same error, so none goes on into a collective rank 0 has left."""
    failure = None
    if comm.is_main():
        try:
            _publish(recipe, run_dir, agreed, reports, source, world, chosen)
        except Exception as err:  # noqa: BLE001 - every rank must hear about it
            failure = f"{type(err).__name__}: {err}"
    failure = comm.broadcast_object(failure)
    if failure is not None:
        raise DDPError(f"data.batch_size=auto: writing the memory probe's results failed on rank 0: {failure}",
                       "check free disk space and permissions of the run dir (and of memory.cache)")


def _publish(recipe: Recipe, run_dir: RunDir, agreed: dict[str, int], reports: list[dict[str, Any]], source: str,
             world: int, chosen: dict[str, int]) -> None:
    """Rank 0 only: log the table, write memory_probe.json (``agreed``: the sizes the run uses;
    ``fits``: what every rank's memory holds), update the cache (with what fits)."""
    for line in table_lines(reports[0], agreed):
        log.info("%s", line)
    record = {"agreed": {KEYS[k]: v for k, v in chosen.items()}, "fits": {KEYS[k]: v for k, v in agreed.items()},
              "source": source, "world_size": world, "ranks": reports}
    write_text_atomic(Path(run_dir.root) / PROBE_FILE, _json(record))
    if source == "probe" and recipe.memory.cache:
        results = {}
        for kind, size in agreed.items():
            probes = [r["probes"][kind] for r in reports if kind in r.get("probes", {})]
            need = max(_need_mb(p) for p in probes)
            results[kind] = {"pick": size, "need_mb": need, "budget_mb": min(p["budget_mb"] for p in probes)}
        cache.store(Path(recipe.memory.cache), reports[0]["cache_key"], results)


def _need_mb(probe: dict[str, Any]) -> float:
    return max((row["peak_mb"] for row in probe["table"] if row["batch"] == probe["pick"] and row["peak_mb"]),
               default=probe["state_mb"])


def _json(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record, indent=1) + "\n"


def table_lines(report: dict[str, Any], agreed: dict[str, int] | None = None) -> list[str]:
    """The estimate and each probe's table as text lines (rank 0's log, ``python -m ddp.probe``)."""
    if "probes" not in report:
        sizes = ", ".join(f"{KEYS[k]}={v}" for k, v in (agreed or {}).items())
        return [f"memory probe: {sizes} (from the {report.get('source', '?')}, no trial steps)"]
    lines = [f"memory probe on {report['device']}: budget {report['budget_mb']:,.1f} MB per rank"
             + (f" ({report['usage']})" if report.get("usage") else "")]
    est = report["estimate_mb"]
    parts = [("parameters", est["parameters"]), ("gradients", est["gradients"]), ("optimizer", est["optimizer"]),
             ("fp32 master", est["master"]), ("DDP buckets", est["ddp_buckets"]),
             ("gathered root + largest block", est.get("gathered")), ("data on device", est.get("data_on_device"))]
    shards = int(report.get("shards") or 1)
    sharded = f" (dist.parallel=fsdp: parameters, gradients and optimizer ÷ {shards})" if shards > 1 else ""
    lines.append("  estimate" + sharded + ": " + ", ".join(f"{name} {mb:,.1f} MB" for name, mb in parts if mb)
                 + (f", activations {est['per_sample']:,.3f} MB/sample + {est['fixed']:,.1f} MB per step (measured)"
                    if est.get("per_sample") is not None else ""))
    for kind, probe in report["probes"].items():
        pick = (agreed or {}).get(kind, probe["pick"])
        total = None
        if est.get("per_sample") is not None and kind == "train":
            total = probe["state_mb"] + est["fixed"] + est["per_sample"] * pick
        own = "" if pick == probe["pick"] else f"; this rank picked {probe['pick']}, another rank less"
        lines.append(f"  {kind}: {probe['trial_steps']} trial steps in {probe['seconds']:.2f} s → {KEYS[kind]}={pick}"
                     + (f" (estimated {total:,.1f} MB{own})" if total is not None else f" ({own[2:]})" if own else ""))
        lines.append(f"    {'batch':>8} {'phase':>8} {'predicted MB':>13} {'peak MB':>10}  result")
        for row in probe["table"]:
            predicted = "-" if row["predicted_mb"] is None else f"{row['predicted_mb']:,.1f}"
            peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:,.1f}"
            mark = "  ← pick" if row["batch"] == probe["pick"] and row["result"] == "fits" else ""  # this rank's
            lines.append(f"    {row['batch']:>8} {row['phase']:>8} {predicted:>13} {peak:>10}  {row['result']}{mark}")
    return lines
