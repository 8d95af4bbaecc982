"""Checkpoint save and resume cost: ``Checkpointer`` ÷ plain ``torch.save`` / ``torch.load``.

State: torchvision ResNet-18 (CIFAR head) + SGD-momentum state after one step (≈ 94 MB), saved to
the same local directory. Each round times both sides once, in alternating order; the report
gives the median of per-round ratios with [min–max] and the absolute medians.

* save — ours: ``Checkpointer.save`` (CRC-32 while streaming, fsync, atomic rename, manifest,
  ``latest`` pointer, pruning); plain: ``torch.save(state, path)`` (no fsync, no rename).
* resume — ours: ``Checkpointer.resume`` (pick newest, size + CRC check, ``weights_only`` load,
  compatibility check, load into model/optimizer/scheduler, RNG restore); plain: ``torch.load``
  + ``load_state_dict`` of model and optimizer.

``python -m bench.checkpoint_save [--rounds N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddp.checkpoint.files import read_pointer
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.config import CheckpointConfig, load_recipe
from ddp.model.zoo import resnet18


def _state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = resnet18((3, 32, 32), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(rounds: int, directory: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Per round (ours, plain) seconds for save and for resume."""
    model, optimizer, scheduler = _state()
    recipe = load_recipe(None, ["model.name=resnet18", "data.name=synthetic", "data.synthetic_shape=[3,32,32]"])
    keeper = Checkpointer(CheckpointConfig(keep=2), directory / "ours", recipe)
    plain_path = directory / "plain" / "state.pt"
    plain_path.parent.mkdir(parents=True)
    state = TrainState(epoch=1, global_step=10)

    def ours_save() -> None:
        state.global_step += 1
        keeper.save(model, optimizer, scheduler, state)

    def plain_save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, plain_path)

    def ours_resume() -> None:
        keeper.resume(keeper.directory / str(read_pointer(keeper.directory, "latest")), model, optimizer)

    def plain_resume() -> None:
        payload = torch.load(plain_path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])

    results: dict[str, tuple[list[float], list[float]]] = {"save": ([], []), "resume": ([], [])}
    ours_save(), plain_save()  # warm the page cache and allocator once
    for round_ in range(rounds):
        for name, ours, plain in (("save", ours_save, plain_save), ("resume", ours_resume, plain_resume)):
            pair = [(0, ours), (1, plain)] if round_ % 2 == 0 else [(1, plain), (0, ours)]
            for side, fn in pair:
                results[name][side].append(_timed(fn))
    return results


def report(results: dict[str, tuple[list[float], list[float]]]) -> list[str]:
    lines = ["| operation | ours ÷ plain, median [min–max] | ours, median s | plain, median s | rounds |",
             "|---|---|---|---|---|"]
    for name, (ours, plain) in results.items():
        ratios = [o / p for o, p in zip(ours, plain)]
        lines.append(f"| {name} | {statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}] | "
                     f"{statistics.median(ours):.3f} | {statistics.median(plain):.3f} | {len(ratios)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_save", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        lines = report(measure(args.rounds, Path(tmp)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
