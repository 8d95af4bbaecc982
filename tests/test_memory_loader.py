"""The in-memory data path gives exactly the DataLoader's batches, on the same samplers."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ddp.data.augment import CropFlip
from ddp.config import DataConfig, LoaderKind, load_recipe
from ddp.data.datasets import load_digits, load_synthetic
from ddp.cluster.environment import SingleProcessEnv
from ddp.data.loaders import ResumableSampler
from ddp.data.device_data import MemoryLoader, choose_loader
from ddp.runner import execute


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_memory_batches_equal_dataloader_batches_for_every_rank_epoch_and_start():
    images, labels = torch.randn(103, 1, 4, 4), torch.randint(0, 10, (103,))
    dataset = TensorDataset(images, labels)
    for world in (1, 2, 3):
        for rank in range(world):
            for epoch, start in ((0, 0), (1, 0), (2, 5 * 3 * world)):
                sampler = ResumableSampler(dataset, world, rank, seed=11)
                sampler.set_epoch(epoch, start)
                expected = _batches(DataLoader(dataset, batch_size=5, sampler=sampler))
                got = _batches(MemoryLoader(images, labels, sampler, batch_size=5))
                assert len(got) == len(expected) == len(MemoryLoader(images, labels, sampler, 5))
                for (gx, gy), (ex, ey) in zip(got, expected):
                    assert torch.equal(gx, ex) and torch.equal(gy, ey)


def test_training_on_memory_batches_is_bitwise_the_dataloader_run(tmp_path):
    def weights(kind: str):
        recipe = load_recipe(None, [f"data.loader={kind}", "train.max_steps=20", f"run.dir={tmp_path / kind}",
                                    "log.tensorboard=false", "log.progress=false"])
        result = execute(recipe, SingleProcessEnv())
        return result.state_dict

    memory, loader = weights("memory"), weights("dataloader")
    for name in memory:
        assert torch.equal(memory[name], loader[name]), name


def test_auto_chooses_memory_only_when_it_fits(monkeypatch):
    digits = load_digits(DataConfig())
    cpu = torch.device("cpu")
    assert choose_loader(LoaderKind.auto, digits, cpu, limit_mb=4096)
    assert not choose_loader(LoaderKind.dataloader, digits, cpu, limit_mb=4096)
    big = load_synthetic(DataConfig(name="synthetic", synthetic_train=4096, synthetic_shape=[3, 32, 32]))
    assert big.tensor_bytes > 2**20 * 50
    assert not choose_loader(LoaderKind.auto, big, cpu, limit_mb=50)
    assert choose_loader(LoaderKind.memory, big, cpu, limit_mb=50)  # asked for explicitly
    monkeypatch.setattr("ddp.data.device_data.free_memory", lambda device: big.tensor_bytes)  # half would not fit
    assert not choose_loader(LoaderKind.auto, big, cpu, limit_mb=4096)


def test_crop_flip_matches_torchvision_semantics():
    fill = (-1.5, 0.25, 2.0)
    images = torch.randn(16, 3, 6, 6)
    out = CropFlip(padding=2, fill=fill)(images, torch.Generator().manual_seed(0))
    padded = F.pad(images, (2, 2, 2, 2))
    for c, value in enumerate(fill):  # what a zero pixel becomes after Normalize
        padded[:, c][F.pad(torch.zeros(6, 6), (2, 2, 2, 2), value=1).bool().expand(16, -1, -1)] = value
    flips = 0
    for i in range(16):
        crops = [padded[i, :, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        plain = any(torch.equal(out[i], crop) for crop in crops)
        flipped = any(torch.equal(out[i], crop.flip(2)) for crop in crops)
        assert plain or flipped, i
        flips += flipped and not plain
    assert 0 < flips < 16


def test_augmentation_is_the_same_after_a_mid_epoch_resume():
    images, labels = torch.randn(40, 3, 6, 6), torch.arange(40)
    augment = CropFlip(padding=2, fill=(0.0, 0.0, 0.0))
    sampler = ResumableSampler(TensorDataset(images, labels), 2, 1, seed=3)
    sampler.set_epoch(4)
    full = _batches(MemoryLoader(images, labels, sampler, 4, augment, seed=9))
    sampler.set_epoch(4, start=2 * 4 * 2)  # two steps of 4 samples on 2 ranks done
    resumed = _batches(MemoryLoader(images, labels, sampler, 4, augment, seed=9))
    assert len(resumed) == len(full) - 2
    for (rx, ry), (fx, fy) in zip(resumed, full[2:]):
        assert torch.equal(ry, fy) and torch.equal(rx, fx)
