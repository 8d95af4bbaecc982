"""Real multi-rank jobs on gloo/CPU: DDP equivalence, determinism, sampler coverage, exact eval."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from ddp.config import load_recipe
from ddp.data.datasets import load_digits
from ddp.cluster.environment import ClusterEnv, SingleProcessEnv
from ddp.engine.evaluation import evaluate
from ddp.data.loaders import ResumableSampler, eval_loader, train_loader
from ddp.model.zoo import digits_cnn
from ddp.runner import execute
from tests.harness import free_port, spawn_ranks

STEPS = 6


def _recipe(tmp: str, batch: int, *extra: str):
    return load_recipe(None, [f"data.batch_size={batch}", f"train.max_steps={STEPS}", f"run.dir={tmp}",
                              "log.tensorboard=false", "log.progress=false", *extra])


def _train_twice(env, tmp: str, batch: int, second_port: int):
    """Two full runs in the same ranks: returns both final weights (as numpy).

    The second run rendezvous on a new port: re-creating a group on the port just torn down can
    let a fast rank reach the old store before rank 0 has closed it.
    """
    out = []
    for attempt, port in enumerate((env.master_port, second_port)):
        result = execute(_recipe(f"{tmp}/{attempt}", batch), replace(env, master_port=port))
        out.append({k: v.numpy() for k, v in result.state_dict.items()})
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_matches_one_process_with_the_global_batch(tmp_path, world):
    per_rank = 8
    ranks = spawn_ranks(_train_twice, world, str(tmp_path / "ddp"), per_rank, free_port(), init_group=False)
    single = execute(_recipe(str(tmp_path / "single"), world * per_rank), SingleProcessEnv()).state_dict
    first, second = ranks[0]
    for name, expected in single.items():
        # DDP on N ranks × batch b == one process × batch N·b on the same samples
        np.testing.assert_allclose(first[name], expected.numpy(), rtol=0, atol=1e-6, err_msg=name)
        # same seed, same world size → bitwise-identical weights
        assert np.array_equal(first[name], second[name]), name
        # every rank holds the same weights
        for other in ranks[1:]:
            assert np.array_equal(other[0][name], first[name]), name
    # training actually moved the weights
    torch.manual_seed(0)
    untouched = digits_cnn((1, 8, 8), 10).state_dict()
    assert any(not np.allclose(first[k], untouched[k].numpy()) for k in first)


class IndexDataset(Dataset):
    """Sample i is (i, 0): the loader's output tells exactly which samples a rank saw."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return index, 0


def _indices_per_epoch(env, size: int, epochs: int):
    dataset = IndexDataset(size)
    sampler = ResumableSampler(dataset, env.world_size, env.rank, seed=7)
    loader = train_loader(dataset, 4, sampler, seed=7, device=torch.device("cpu"), workers=0)
    seen = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        seen.append([int(i) for batch, _ in loader for i in batch])
    return seen


def _indexed_splits(size: int):
    """Images whose first pixel is the sample's index, as a Dataset and as in-memory tensors."""
    from ddp.data.datasets import Splits, Tensors

    images = torch.randn(size, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.arange(size, dtype=torch.float32)
    labels = torch.arange(size) % 10
    tensors = Tensors(images, labels, images[:8], labels[:8])
    return Splits(TensorDataset(images, labels), TensorDataset(images[:8], labels[:8]), (1, 8, 8), 10, True,
                  materialise=lambda: tensors)


def _trained_sample_order(env, tmp: str, size: int, epochs: int, loader: str):
    """The sample indices this rank trained on, per epoch, through the real trainer (which alone
    tells the sampler the epoch)."""
    from ddp import runner
    from ddp.engine.trainer import Trainer

    seen: list[list[int]] = [[] for _ in range(epochs)]
    original = Trainer._run_batch

    def recording(self, inputs, targets, sums):
        seen[self.state.epoch].extend(int(v) for v in inputs[:, 0, 0, 0].tolist())
        return original(self, inputs, targets, sums)

    runner.build_datasets = lambda cfg: _indexed_splits(size)
    Trainer._run_batch = recording
    try:
        execute(load_recipe(None, ["data.batch_size=4", f"train.epochs={epochs}", f"run.dir={tmp}",
                                   f"data.loader={loader}", "log.tensorboard=false", "log.progress=false"]), env)
    finally:
        Trainer._run_batch = original
    return seen


@pytest.mark.parametrize("world, loader", [(2, "memory"), (3, "dataloader")])
def test_each_training_sample_seen_once_per_epoch_across_ranks(tmp_path, world, loader):
    """Through the trainer: every sample exactly once per epoch over the ranks, the same number of
    steps on each rank, and a new order every epoch (the trainer reseeds the sampler itself)."""
    size, epochs = 24, 3  # divisible by 2 and 3: no padding
    per_rank = spawn_ranks(_trained_sample_order, world, str(tmp_path / "run"), size, epochs, loader,
                           init_group=False, timeout=180)
    for epoch in range(epochs):
        union = sorted(i for rank in per_rank for i in rank[epoch])
        assert union == list(range(size)), f"epoch {epoch}"
        assert {len(rank[epoch]) for rank in per_rank} == {size // world}, f"epoch {epoch}"
    orders = [[rank[epoch] for rank in per_rank] for epoch in range(epochs)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


class MarkedDataset(Dataset):
    """Sample i: an 8×8 image whose first pixels carry i, the pid of the process that loaded it
    (in two parts, exact in float32) and a draw from torch's RNG there (what a random augmentation
    in a DataLoader worker would use)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        image = torch.zeros(1, 8, 8)
        pid = os.getpid()
        image[0, 0, :4] = torch.tensor([float(index), float(pid // 1000), float(pid % 1000), torch.rand(()).item()])
        return image, index % 10


def _loaded_by_workers(tmp: Path, seed: int) -> tuple[list[set[int]], dict[tuple[int, int], float]]:
    """Train 2 epochs on MarkedDataset through the DataLoader path with automatic workers: the pids
    that loaded each epoch's batches, and each (epoch, sample)'s random draw."""
    from ddp import runner
    from ddp.data.datasets import Splits
    from ddp.engine.trainer import Trainer

    pids: list[set[int]] = [set(), set()]
    draws: dict[tuple[int, int], float] = {}
    original_batch, original_datasets, threads = Trainer._run_batch, runner.build_datasets, torch.get_num_threads()

    def recording(self, inputs, targets, sums):
        marks = inputs[:, 0, 0, :4].tolist()
        for index, high, low, draw in marks:
            pids[self.state.epoch].add(int(high) * 1000 + int(low))
            draws[(self.state.epoch, int(index))] = draw
        inputs = inputs.clone()
        inputs[:, 0, 0, :4] = 0.0
        return original_batch(self, inputs, targets, sums)

    runner.build_datasets = lambda cfg: Splits(MarkedDataset(24), MarkedDataset(8), (1, 8, 8), 10, False)
    Trainer._run_batch = recording
    try:
        execute(load_recipe(None, ["data.batch_size=4", "train.epochs=2", f"train.seed={seed}", f"run.dir={tmp}",
                                   "dist.threads_per_rank=3", "log.tensorboard=false", "log.progress=false"]),
                SingleProcessEnv())
    finally:
        Trainer._run_batch, runner.build_datasets = original_batch, original_datasets
        torch.set_num_threads(threads)
    return pids, draws


def test_dataloader_workers_are_persistent_and_their_randomness_is_seeded(tmp_path):
    """docs/architecture.md: a dataset that is not in memory is read by min(4, threads − 1) DataLoader
    workers (2 at 3 threads), the same processes every epoch, with random draws fixed by train.seed."""
    pids, draws = _loaded_by_workers(tmp_path / "a", seed=0)
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]  # two worker processes, not this one
    assert pids[1] == pids[0]  # persistent: epoch 2 is loaded by the same processes
    assert len(draws) == 2 * 24
    _, again = _loaded_by_workers(tmp_path / "b", seed=0)
    assert again == draws  # other processes, the same draws
    _, other = _loaded_by_workers(tmp_path / "c", seed=1)
    assert other.keys() == draws.keys() and all(other[k] != draws[k] for k in draws)


def test_uneven_training_set_is_padded_like_distributed_sampler():
    world, size = 4, 25
    per_rank = [_indices_per_epoch(ClusterEnv(rank=r, world_size=world, local_world_size=world), size, 1)[0]
                for r in range(world)]
    union = [i for rank in per_rank for i in rank]
    assert sorted(set(union)) == list(range(size))  # nothing skipped
    assert len(union) == 28 and len(union) - len(set(union)) == world - 25 % world  # 3 repeats pad the shard
    assert {len(rank) for rank in per_rank} == {7}


def _exact_eval(env):
    digits = load_digits(load_recipe(None).data)
    torch.manual_seed(3)
    model = digits_cnn((1, 8, 8), 10)
    for param in model.parameters():  # a fixed, non-trivial model: some digits right, some wrong
        param.data.mul_(4)
    loader = eval_loader(digits.test, 16, env.rank, env.world_size, torch.device("cpu"), workers=0)
    result = evaluate(model, loader, torch.device("cpu"))
    return result.accuracy, result.count, result.loss, len(loader.sampler)


def test_exact_eval_is_identical_at_every_world_size():
    one = _exact_eval(SingleProcessEnv())
    assert one[1] == 359 and 0.05 < one[0] < 0.95  # 359 is prime: no world size divides it
    for world in (2, 3, 4):
        ranks = spawn_ranks(_exact_eval, world)
        for accuracy, count, loss, _ in ranks:
            assert count == 359
            assert accuracy == one[0]
            assert loss == pytest.approx(one[2], rel=1e-6)  # float32 per-batch sums, other batching
        assert sum(shard for *_, shard in ranks) == 359  # unpadded shards: no sample twice
