"""``dist.gradient_as_bucket_view``, ``dist.bucket_cap_mb`` and ``dist.static_graph``: they reach
DistributedDataParallel on real Gloo ranks, gradients stay right when they are views into DDP's
buckets, and bad values or combinations are refused in one line before any rank starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddp.config import load_recipe
from ddp.errors import ConfigError
from tests.harness import run_cli, spawn_ranks

WORLD = 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def _wrap_and_step(env, runs: list[list[str]]):
    """Per recipe overrides: wrap ``_net`` as ``ddp.train`` does, run 3 backward passes with the
    gradients set to None before each, and report DDP's settings, every step's gradients and how
    many storages the gradients live in."""
    from ddp.cluster.devices import Devices
    from ddp.model.parallel import ddp_options, wrap_model

    out = []
    for overrides in runs:
        recipe = load_recipe(None, overrides)
        model = wrap_model(_net(), recipe.dist.parallel, torch.device("cpu"), Devices(False, 0),
                           ddp_kwargs=ddp_options(recipe.dist))
        settings = (type(model).__name__, model.gradient_as_bucket_view, model.static_graph, model.bucket_bytes_cap)
        grads = []
        for step in range(3):
            model.zero_grad(set_to_none=True)
            model(_batch(env.rank, step)).sum().backward()
            grads.append([p.grad.detach().clone().numpy() for p in model.parameters()])
        storages = len({p.grad.untyped_storage().data_ptr() for p in model.parameters()})
        out.append((settings, grads, storages))
    return out


def _reference_grads() -> list[list[np.ndarray]]:
    """One process, the mean of both ranks' losses: what every rank's all-reduced gradient must be."""
    model, grads = _net(), []
    for step in range(3):
        model.zero_grad(set_to_none=True)
        (sum(model(_batch(rank, step)).sum() for rank in range(WORLD)) / WORLD).backward()
        grads.append([p.grad.detach().clone().numpy() for p in model.parameters()])
    return grads


def test_the_keys_reach_ddp_and_gradients_as_bucket_views_stay_right():
    runs = [[],  # the defaults
            ["dist.gradient_as_bucket_view=false", "dist.bucket_cap_mb=2.5", "dist.static_graph=true"]]
    ranks = spawn_ranks(_wrap_and_step, WORLD, runs, timeout=120)
    reference = _reference_grads()
    for rank in ranks:
        (defaults, default_grads, default_storages), (changed, changed_grads, changed_storages) = rank
        assert defaults == ("DistributedDataParallel", True, False, 25 * 1024 * 1024)
        assert changed == ("DistributedDataParallel", False, True, int(2.5 * 1024 * 1024))
        assert default_storages == 1  # every gradient is a view into DDP's one bucket (the net is 0.001 MB)
        assert changed_storages == 4  # a gradient tensor of its own per parameter
        for grads in (default_grads, changed_grads):
            for step, expected in enumerate(reference):
                for got, want in zip(grads[step], expected):
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides, problem", [
    (["dist.bucket_cap_mb=0"], "dist.bucket_cap_mb=0.0 is invalid: it must be > 0.0"),
    (["dist.bucket_cap_mb=-25"], "dist.bucket_cap_mb=-25.0 is invalid: it must be > 0.0"),
    (["dist.bucket_cap_mb=big"], "bad value for 'dist.bucket_cap_mb'"),
    (["dist.gradient_as_bucket_view=maybe"], "bad value for 'dist.gradient_as_bucket_view'"),
    (["dist.static_graph=true", "train.accumulate=4"],
     "dist.static_graph=true cannot be combined with train.accumulate=4"),
])
def test_bad_values_and_combinations_are_refused(overrides, problem):
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(None, overrides)


def test_static_graph_alone_and_accumulation_alone_are_accepted():
    assert load_recipe(None, ["dist.static_graph=true"]).dist.static_graph
    assert load_recipe(None, ["train.accumulate=4"]).train.accumulate == 4
    # under FSDP the key is unused (a warning says so when the model is sharded): nothing to refuse
    assert load_recipe(None, ["dist.parallel=fsdp", "dist.static_graph=true", "train.accumulate=4"]).dist.static_graph


def test_static_graph_with_accumulation_is_one_line_exit_2_before_any_rank(tmp_path):
    done = run_cli(["-m", "ddp.train", "dist.static_graph=true", "train.accumulate=2"], cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: dist.static_graph=true cannot be combined with train.accumulate=2: DDP's static graph must "
        "all-reduce in its first backward, which accumulation skips (no_sync). "
        "HINT: set dist.static_graph=false, or train.accumulate=1")
    assert not (tmp_path / "runs").exists()


def _prime_then_forward(env) -> list[tuple[bool, bool]]:
    """A resumed run's first batch on a fresh DDP model: ``Trainer._prime_buckets``, then the first
    real forward. For static_graph false, then true: (regrouped before that forward, regrouped by it)."""
    return [_prime_one(env, static_graph) for static_graph in (False, True)]


def _prime_one(env, static_graph: bool) -> tuple[bool, bool]:
    from types import SimpleNamespace

    from ddp.cluster.devices import Devices
    from ddp.config import Precision
    from ddp.engine.trainer import Trainer
    from ddp.model.parallel import ddp_options, wrap_model

    recipe = load_recipe(None, [f"dist.static_graph={str(static_graph).lower()}"])
    model = wrap_model(_net(), recipe.dist.parallel, torch.device("cpu"), Devices(False, 0),
                       ddp_kwargs=ddp_options(recipe.dist))
    parts = SimpleNamespace(model=model, loss=nn.functional.cross_entropy, device=torch.device("cpu"),
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = SimpleNamespace(_prime=True, parts=parts, cfg=SimpleNamespace(train=SimpleNamespace(precision=Precision.fp32)))
    inputs, targets = _batch(env.rank, 0), torch.tensor([0, 1, 2])
    Trainer._prime_buckets(trainer, inputs, targets)
    before = model._has_rebuilt_buckets
    model(inputs)  # DDP regroups its buckets here, before the forward, once it has recorded an order
    return before, model._has_rebuilt_buckets


def test_resume_priming_regroups_ddp_buckets_before_the_first_real_step_with_and_without_static_graph():
    """At 3+ ranks the first step after a resume must all-reduce in the regrouped buckets, as the
    uninterrupted run's later steps do (bit-exact resumes). A static graph records the order only
    in its second backward, so one priming pass is not enough there."""
    ranks = spawn_ranks(_prime_then_forward, 3, timeout=120)
    assert ranks == [[(False, True), (False, True)]] * 3, ranks  # [rank][static_graph false, true]
