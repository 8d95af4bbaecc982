"""The Python API: ``ddp.fit(recipe, model=..., data=..., **overrides)``, for people who prefer code.

It runs exactly what ``python -m ddp.train`` runs (same checks, run directory, checkpoints and
resume), on one process or on every rank of torchrun / srun. All ranks must call ``fit``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddp.model.registry import Given
from ddp.config import Recipe, load_recipe
from ddp.cluster.environment import detect_environment, launcher_rank
from ddp.errors import DDPError, print_error


def fit(recipe: str | Path | Mapping[str, Any] | None = None, *, model: Any = None, data: Any = None,
        **overrides: Any) -> Any:
    """Train and return the ``ddp.runner.RunResult`` (metrics of the last epoch, final weights, run dir).

    ``recipe``: a YAML path, a dict of sections (``{"train": {"epochs": 3}}``), or None for the defaults. ``model``: an nn.Module,
    or a class/function returning one (called with ``model.args``). ``data``: a (train, test) pair of
    Datasets, or a function returning one (called with ``data.args``). ``overrides``: recipe keys
    with '__' for '.', e.g. ``train__epochs=3`` (or ``**{"train.epochs": 3}``).

    A refused run (bad recipe, missing data, unusable checkpoint) prints one line on rank 0 and
    raises ``SystemExit(2)``; a stop signal raises ``SystemExit(75 or 130)`` after checkpointing.
    """
    from ddp import runner  # torch and friends load here, not at ``import ddp``

    try:
        resolved = _recipe(recipe, overrides, model, data)
        env = detect_environment()
        given = Given(model=model, data=data)
        plan = runner.prepare(resolved, env, given=given)
    except DDPError as err:
        print_error(err, launcher_rank())
        raise SystemExit(err.exit_code) from None
    result = runner.execute_logged(resolved, env, plan)
    if result.exit_code:
        raise SystemExit(result.exit_code)
    return result


def build_run(recipe: str | Path | Mapping[str, Any] | None, overrides: dict[str, Any]) -> Any:
    """All ranks must call. An open ``ddp.run.Run`` for ``ddp.setup``; a refusal is said once
    (rank 0) and raises ``SystemExit`` on every rank."""
    from ddp import runner
    from ddp.run import Run

    try:
        resolved = _recipe(recipe, overrides, None, None)
        env = detect_environment()
        placement, devices, threads = runner.place_rank(resolved, env)
        return Run(resolved, env, placement, devices, threads).open()
    except DDPError as err:
        print_error(err, launcher_rank())
        raise SystemExit(err.exit_code) from None


def _recipe(recipe: str | Path | Mapping[str, Any] | None, overrides: dict[str, Any], model: Any,
            data: Any) -> Recipe:
    if isinstance(recipe, Mapping):  # ddp.fit({"train": {"epochs": 3}}): the same as overrides
        overrides, recipe = {**_dotted(recipe), **overrides}, None
    items = [f"{key.replace('__', '.')}={_yaml(value)}" for key, value in overrides.items()]
    if model is not None:
        items.append(f"model.name={_qualified(model)}")
    if data is not None:
        items.append(f"data.name={_qualified(data)}")
    return load_recipe(recipe, items)


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} → {"train.epochs": 3}; dict-valued keys (``model.args``) stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "." not in name:
            out.update(_dotted(value, f"{name}."))
        else:
            out[name] = value
    return out


def _qualified(value: Any) -> str:
    """The name the run records for a model or data given in code: ``module:QualName``."""
    if isinstance(value, (tuple, list)):
        return "ddp.fit:data"
    target = value if inspect.isclass(value) or inspect.isfunction(value) else type(value)
    return f"{target.__module__}:{target.__qualname__}"


def _yaml(value: Any) -> str:
    import json

    return "null" if value is None else json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)
