"""The memory estimate under FSDP (``dist.parallel=fsdp``): shards per parameter as FSDP2 pads
them, the root and the largest gathered block, the probe's table, and a DDP refusal that says
whether sharding would fit. One process, no collectives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp.cluster.environment import ClusterEnv
from ddp.config import load_recipe
from ddp.errors import MemoryBudgetError
from ddp.memory.estimate import MB, estimate_state, gathered_bytes, shard_numel
from ddp.memory.resolve import KEYS, check_budget, probe_recipe, table_lines
from ddp.model.zoo import resnet18

# Made-up sizes: two blocks (the Sequential's layers), nothing for the root.
#   Linear(10, 100): weight 100×10 + bias 100 = 1,100    Linear(100, 7): weight 7×100 + bias 7 = 707
WHOLE = 1_100 + 707


def two_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 100), nn.Linear(100, 7))


def test_one_shard_is_the_ddp_estimate_without_its_buckets():
    ddp = estimate_state(two_layers(), "adamw", ddp_ranks=4)
    fsdp = estimate_state(two_layers(), "adamw", shards=1)
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (ddp.parameters, ddp.gradients, ddp.optimizer)
    assert fsdp.gathered == 0 and fsdp.ddp_buckets == 0
    assert fsdp.state == ddp.state - ddp.ddp_buckets == 4 * WHOLE * 4  # params + grads + 2 Adam moments


def test_four_shards_pad_dim_0_per_parameter_and_add_the_largest_block():
    est = estimate_state(two_layers(), "adamw", shards=4)
    # rank's shard: ceil(rows / 4) rows → 25×10 + 25 + 2×100 + 2 = 477 elements (whole ÷ 4 = 451.75)
    shard = 25 * 10 + 25 + 2 * 100 + 2
    assert (est.parameters, est.gradients, est.optimizer) == (4 * shard, 4 * shard, 8 * shard)
    assert WHOLE / 4 <= shard <= WHOLE / 4 + 4 * 100  # ≤ one row of padding per parameter
    assert est.ddp_buckets == 0
    assert est.gathered == 4 * (1_100 + 1_100 + 1_100)  # layer 1 whole + its gradient + the next, gathered ahead
    assert est.state == 16 * shard + 13_200
    assert shard_numel(torch.zeros(()), 4) == 1 and shard_numel(torch.zeros(8, 3), 4) == 6


def test_the_root_stays_gathered_and_frozen_parameters_have_no_gradient():
    model = nn.Module()
    model.body = nn.ModuleList([nn.Linear(10, 10), nn.Linear(10, 10)])  # 110 each: the blocks
    model.head = nn.Linear(10, 50)  # 550: the root keeps it gathered
    assert gathered_bytes(model) == 4 * (550 + 550)  # root params + max(block 3 × 110, root grad 550)
    model.head.requires_grad_(False)
    assert gathered_bytes(model) == 4 * (550 + 330)
    assert estimate_state(model, "sgd", 0.9, shards=2).gradients == 4 * 2 * (5 * 10 + 5)


def test_resnet18_at_4_ranks_is_a_quarter_plus_its_largest_block():
    model = resnet18((3, 32, 32), 10)
    whole = estimate_state(model, "sgd", 0.9)
    sharded = estimate_state(model, "sgd", 0.9, shards=4)
    for part in ("parameters", "gradients", "optimizer"):
        assert getattr(whole, part) / 4 <= getattr(sharded, part) <= getattr(whole, part) / 4 * 1.01
    block = max(sum(p.numel() for p in b.parameters()) for b in [*model.layer4, *model.layer3])
    root = sum(p.numel() for m in (model.conv1, model.bn1, model.fc) for p in m.parameters())
    assert sharded.gathered == 4 * (root + 3 * block)
    assert round(sharded.state / MB, 1) == 86.1 and round(whole.state / MB, 1) == 128.0
    rows = dict(sharded.rows(None))
    assert rows["parameters ÷ 4"] == "10.7" and rows["gathered: root + largest block (whole)"] == "54.1"
    with pytest.raises(ValueError):
        estimate_state(model, "sgd", ddp_ranks=4, shards=4)


def _recipe(*overrides: str):
    return load_recipe(None, ["data.batch_size=auto", "data.loader=dataloader", *overrides])


def _digits():
    from ddp.config import DataConfig
    from ddp.data.datasets import load_digits

    return load_digits(DataConfig())


def _refusal(budget_mb: int, *overrides: str) -> str:
    """check_budget's refusal under DDP at 4 ranks, for ResNet-18 on 3×32×32 inputs unless
    ``overrides`` say otherwise (SGD with momentum: 42.7 MB each of parameters, gradients and
    momentum, gradients as bucket views: 128.0 MB; under FSDP 3 × 10.7 + 54.1 gathered = 86.1 MB)."""
    from ddp.data.datasets import build_datasets

    recipe = _recipe(f"memory.budget_mb={budget_mb}", "model.name=resnet18", "data.name=synthetic",
                     "data.synthetic_shape=[3,32,32]", "data.synthetic_train=64", "data.synthetic_test=64", *overrides)
    with pytest.raises(MemoryBudgetError) as info:
        check_budget(recipe, ClusterEnv(world_size=4, local_world_size=4), build_datasets(recipe.data),
                     torch.device("cpu"))
    return str(info.value)


def test_a_ddp_refusal_names_fsdp_with_its_numbers_when_it_would_fit():
    message = _refusal(100)
    assert message.startswith("data.batch_size=auto: the model needs 128.0 MB before any activation per rank "
                              "(parameters 42.7 + gradients 42.7 + optimizer 42.7 MB), more than the memory budget "
                              "of 100.0 MB. HINT: under dist.parallel=fsdp at 4 ranks it would need 86.1 MB per "
                              "rank before any activation (parameters 10.7 + gradients 10.7 + optimizer 10.7 "
                              "(shards: each ÷ 4) + gathered root + largest block 54.1 MB), which fits the 100.0 MB "
                              "budget: try dist.parallel=fsdp with data.batch_size=N (auto's trial steps would "
                              "need a whole copy of the model, 128.0 MB); or ")
    assert "\n" not in message


def test_auto_under_fsdp_refuses_a_model_whose_whole_copy_exceeds_the_budget_before_any_trial():
    """The shards fit 100 MB (86.1 MB), the whole copy the trial steps run on does not (128.0 MB). The
    check before the group lets it pass (a resume takes its batch from the checkpoint and a cached
    pick needs no trial); the probe refuses before the copy goes to the device."""
    from ddp.data.datasets import build_datasets

    def resnet(budget_mb: int, *extra: str):
        return _recipe("dist.parallel=fsdp", f"memory.budget_mb={budget_mb}", "model.name=resnet18",
                       "data.name=synthetic", "data.synthetic_shape=[3,32,32]", "data.synthetic_train=64",
                       "data.synthetic_test=64", *extra)

    recipe = resnet(100, "data.eval_batch_size=auto")
    splits = build_datasets(recipe.data)
    check_budget(recipe, ClusterEnv(world_size=4, local_world_size=4), splits, torch.device("cpu"))
    with pytest.raises(MemoryBudgetError) as info:
        probe_recipe(recipe, splits, torch.device("cpu"), 4, ["train", "eval"])
    assert str(info.value) == (
        "data.batch_size/data.eval_batch_size=auto under dist.parallel=fsdp measures the activations on a whole "
        "copy of the model on each rank, and that copy needs 128.0 MB before any activation, more than the memory "
        "budget of 100.0 MB (sharded over 4 ranks, a rank holds 86.1 MB before any activation). HINT: give "
        "data.batch_size=N and data.eval_batch_size=N with dist.parallel=fsdp, leaving 13.9 MB per rank for the "
        "activations")
    with pytest.raises(MemoryBudgetError) as info:  # shards that do not fit either: refused before the group
        check_budget(resnet(80), ClusterEnv(world_size=4, local_world_size=4), splits, torch.device("cpu"))
    assert str(info.value).startswith("data.batch_size=auto: the model needs 86.1 MB before any activation")


def test_a_ddp_refusal_does_not_suggest_fsdp_when_it_would_not_fit():
    message = _refusal(80)
    assert "under dist.parallel=fsdp at 4 ranks it would need 86.1 MB per rank" in message
    assert "which does not fit either" in message and "try dist.parallel=fsdp" not in message
    # the digits CNN's first linear layer is most of it: gathered whole, FSDP needs more than DDP
    message = _refusal(1, "model.name=digits_cnn", "data.synthetic_shape=[1,8,8]")
    assert "needs 1.7 MB before any activation" in message and "it would need 1.9 MB per rank" in message
    assert "try dist.parallel=fsdp" not in message
    with pytest.raises(MemoryBudgetError) as info:  # one rank: sharding has nothing to offer
        check_budget(_recipe("memory.budget_mb=1"), ClusterEnv(), _digits(), torch.device("cpu"))
    assert "fsdp" not in str(info.value)


def test_the_probe_under_fsdp_sits_its_trials_on_the_sharded_state():
    recipe = _recipe("dist.parallel=fsdp", "memory.budget_mb=60")
    probe = probe_recipe(recipe, _digits(), torch.device("cpu"), 4, ["train"])
    assert probe.results["train"].state == probe.estimate.state  # shards + gathered, not the whole copy
    assert probe.estimate.shards == 4 and probe.estimate.ddp_buckets == 0
    lines = table_lines({"source": "probe", **probe.to_json()})
    assert lines[1].startswith("  estimate (dist.parallel=fsdp: parameters, gradients and optimizer ÷ 4): "
                               "parameters 0.1 MB, gradients 0.1 MB, optimizer 0.1 MB, gathered root + largest "
                               "block 1.5 MB")
    assert f"{KEYS['train']}=" in lines[2] and "← pick" in "\n".join(lines)


def test_under_fsdp_a_gpu_budget_counts_the_whole_copy_the_probe_put_there_and_nothing_before():
    """The budget is this rank's free memory plus what the model holds there already. Under FSDP a GPU
    holds none of the model before it is sharded (placed block by block), but the probe's whole copy
    while it runs: the budget is the same read before and after that copy arrives."""
    from types import SimpleNamespace

    from ddp.memory.resolve import _budget, _estimate, _whole_held

    model, cuda = resnet18((3, 32, 32), 10), torch.device("cuda", 0)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    recipe, splits = _recipe("dist.parallel=fsdp"), SimpleNamespace(in_memory=False)
    estimate = _estimate(recipe, model, 4, 0)
    free = 1000 * MB

    def on(room: float):
        return SimpleNamespace(device=cuda, room=lambda: room)

    before = _budget(recipe, on(free), estimate, splits, _whole_held(model, cuda))  # the model in host memory
    assert _whole_held(model, cuda) == 0 and _whole_held(model, torch.device("cpu")) == whole
    copied = resnet18((3, 32, 32), 10).to("meta")  # where the probe's copy is, as the device (no GPU here)
    during = _budget(recipe, on(free - whole), estimate, splits, _whole_held(copied, torch.device("meta")))
    assert before == during == pytest.approx(0.9 * free)
    ddp = _estimate(_recipe(), model, 4, 0)  # DDP, once the probe's whole copy is on the GPU: its parameters held
    assert _budget(_recipe(), on(free - whole), ddp, splits, _whole_held(copied, torch.device("meta"))) == \
        pytest.approx(0.9 * free)


def test_under_fsdp_a_trial_never_adds_more_than_the_fraction_of_what_is_free_beside_the_whole_copy():
    """The sharded state leaves a large budget, but the trials run beside the whole copy: on a device
    with room for 1,000 samples beside it, the pick stays at memory.fraction (0.9) of that room, where
    without the ceiling the search would go on up to the out-of-memory error at 1,000 (or, on the
    CPU, into the kernel's OOM killer)."""
    from bench.simulated_memory import SimulatedDevice
    from ddp.memory.trials import probe_model
    from ddp.model.zoo import mnist_mlp

    device = SimulatedDevice(cap=1_000, per_sample=0.25 * MB, seed=1)
    model = device.attach(mnist_mlp((1, 4, 4), 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sharded = estimate_state(model, "sgd", 0.9, shards=4)
    roomy = sharded.state + 100 * device.budget()
    pick = probe_model(model, optimizer, (1, 4, 4), 10, device, roomy, {"train": 10**7}, sharded)["train"].pick
    assert 0.85 * 1_000 <= pick <= 0.9 * 1_000
    whole = estimate_state(model, "sgd", 0.9)  # DDP's search is the budget's alone: up to the device's cap
    model = device.attach(mnist_mlp((1, 4, 4), 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert probe_model(model, optimizer, (1, 4, 4), 10, device, whole.state + 100 * device.budget(),
                       {"train": 10**7}, whole)["train"].pick > 0.95 * 1_000
